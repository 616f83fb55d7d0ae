"""Pure domain logic: DICOM to model input, prompts, the report schema, FHIR resources,
fairness metrics, the job ledger models. No network calls, no Prefect, no connectors."""
