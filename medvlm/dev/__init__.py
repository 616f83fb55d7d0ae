"""Development, demo and test tooling: never imported by a worker in production.

The local dev servers (Orthanc, a FHIR R4 server) and their supervisor (``servers``, ``cli``),
the tiny random-weight checkpoint builder (``tiny_model``), synthetic DICOM and the sample cohort
(``synthetic_dicom``, ``sample_cohort``, ``sample_data``) and the demo (``demo``). Their extra
dependencies (transformers' model classes, tokenizers, safetensors, pydicom-data) come with
``medvlm-pipeline[dev]``; a flows or serving image installs the package without them. Production
code reaches in here only where random weights are explicitly allowed
(``serving.model_source.resolve_model``) and from the CLI's demo and dev commands.
"""
