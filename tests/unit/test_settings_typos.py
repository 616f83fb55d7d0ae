"""Every ``MEDVLM_`` variable names a setting: a typo is an error at load time that names the
variable and the closest setting, and invalid settings end a command with one line.

pydantic-settings ignores a variable that matches no field (``MEDVLM_JOB__CONCURENCY=8`` left
the concurrency at its default, silently); ``MedvlmSettings`` checks them itself
(``medvlm.settings.variable_problems``), in the environment and in a .env file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medvlm.cli import app
from medvlm.errors import ConfigurationError
from medvlm.settings import (
    NOT_SETTINGS,
    MedvlmSettings,
    SettingsVariableError,
    describe_settings_error,
    setting_variables,
    variable_problems,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``MEDVLM_`` variable but the project home."""
    for name in list(os.environ):
        if name.upper().startswith("MEDVLM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path))
    return monkeypatch


def _load_error(env: pytest.MonkeyPatch, **variables: str) -> str:
    for name, value in variables.items():
        env.setenv(name, value)
    with pytest.raises(SettingsVariableError) as raised:
        MedvlmSettings()
    return str(raised.value)


def test_a_typo_in_a_nested_setting_names_the_variable_and_the_closest_one(
    env: pytest.MonkeyPatch,
) -> None:
    assert _load_error(env, MEDVLM_JOB__CONCURENCY="8") == (
        "MEDVLM_JOB__CONCURENCY is not a setting; did you mean MEDVLM_JOB__CONCURRENCY?"
    )


def test_a_typo_in_a_section_name_is_found_too(env: pytest.MonkeyPatch) -> None:
    assert _load_error(env, MEDVLM_EHRR__BASE_URL="https://ehr/fhir") == (
        "MEDVLM_EHRR__BASE_URL is not a setting; did you mean MEDVLM_EHR__BASE_URL?"
    )


def test_several_typos_at_any_depth_are_all_named_on_one_line(env: pytest.MonkeyPatch) -> None:
    message = _load_error(
        env,
        MEDVLM_JOB__CONCURENCY="8",
        MEDVLM_JOB__MODEL_CLIENT__READ_TIMEOUT="30",  # a section inside a section
        MEDVLM_SERVING__NUM_GPU="1",
        MEDVLM_HOMEE="/srv",
        MEDVLM_JOB__CONCURRENCY__MAX="3",  # below a plain value: nothing is
        MEDVLM_JOB__MAX_ATTEMPTS="5",  # a real one among them
    )
    assert "\n" not in message
    assert message.split("; did you mean ")[0] == "MEDVLM_HOMEE is not a setting"
    for typo, meant in [
        ("MEDVLM_HOMEE", "MEDVLM_HOME"),
        ("MEDVLM_JOB__CONCURENCY", "MEDVLM_JOB__CONCURRENCY"),
        ("MEDVLM_JOB__CONCURRENCY__MAX", "MEDVLM_JOB__CONCURRENCY"),
        ("MEDVLM_JOB__MODEL_CLIENT__READ_TIMEOUT", "MEDVLM_JOB__MODEL_CLIENT__READ_TIMEOUT_S"),
        ("MEDVLM_SERVING__NUM_GPU", "MEDVLM_SERVING__NUM_GPUS"),
    ]:
        assert f"{typo} is not a setting; did you mean {meant}?" in message
    assert "MAX_ATTEMPTS" not in message


def test_a_name_like_no_setting_says_so(env: pytest.MonkeyPatch) -> None:
    assert _load_error(env, MEDVLM_XYZZY="1") == (
        "MEDVLM_XYZZY is not a setting; no setting has a similar name"
    )


def test_names_are_matched_in_any_case_as_pydantic_settings_reads_them(
    env: pytest.MonkeyPatch,
) -> None:
    assert _load_error(env, medvlm_job__concurency="8").startswith("MEDVLM_JOB__CONCURENCY ")
    env.delenv("medvlm_job__concurency")
    env.setenv("medvlm_job__concurrency", "8")
    assert MedvlmSettings().job.concurrency == 8


def test_the_error_is_a_configuration_error_and_a_value_error() -> None:
    # ConfigurationError: the project's tree; ValueError: where invalid settings were caught.
    assert issubclass(SettingsVariableError, ConfigurationError)
    assert issubclass(SettingsVariableError, ValueError)


def test_every_setting_at_every_depth_is_accepted(env: pytest.MonkeyPatch) -> None:
    variables = setting_variables()
    assert {"MEDVLM_HOME", "MEDVLM_JOB", "MEDVLM_JOB__MODEL_CLIENT__CA_BUNDLE"} <= set(variables)
    assert variables["MEDVLM_JOB__CONCURRENCY"] == "job.concurrency"
    assert variable_problems(dict.fromkeys(variables)) == []  # (None: no value to parse)
    env.setenv("MEDVLM_JOB__MODEL_CLIENT__READ_TIMEOUT_S", "42")
    env.setenv("MEDVLM_JOB__PREFLIGHT", "false")
    settings = MedvlmSettings()
    assert settings.job.model_client.read_timeout_s == 42
    assert settings.job.preflight is False


def test_keys_below_a_mapping_setting_are_its_entries(env: pytest.MonkeyPatch) -> None:
    env.setenv("MEDVLM_EHR__PATIENT_IDENTIFIER_ISSUERS__HOSP_A", "urn:oid:1.2.3")
    env.setenv("MEDVLM_EHR__PATIENT_IDENTIFIER_ISSUERS__HOSPB", "urn:oid:1.2.4")
    issuers = MedvlmSettings().ehr.patient_identifier_issuers
    assert issuers == {"hosp_a": "urn:oid:1.2.3", "hospb": "urn:oid:1.2.4"}
    assert variable_problems({"MEDVLM_EHR__PATIENT_IDENTIFIER_ISSUERS__A__B": "x"}) == []


def test_a_whole_section_as_json_still_works_and_its_keys_are_checked(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("MEDVLM_JOB", '{"concurrency": 3, "model_client": {"verify_tls": false}}')
    settings = MedvlmSettings()
    assert settings.job.concurrency == 3
    assert settings.job.model_client.verify_tls is False
    env.setenv("MEDVLM_JOB", '{"concurency": 3, "model_client": {"verify_tl": false}}')
    with pytest.raises(SettingsVariableError) as raised:
        MedvlmSettings()
    assert str(raised.value) == (
        '"concurency" (a key of the JSON in MEDVLM_JOB) is not a setting; did you mean '
        '"concurrency"?; "verify_tl" (a key of the JSON in MEDVLM_JOB) is not a setting; '
        'did you mean "verify_tls"?'
    )


def test_a_structured_value_that_is_not_json_names_its_variable(env: pytest.MonkeyPatch) -> None:
    # pydantic-settings would say: error parsing value for field "job" from source ...
    assert _load_error(env, MEDVLM_JOB__REPORTABLE_MODALITIES="CR,DX") == (
        "MEDVLM_JOB__REPORTABLE_MODALITIES is not JSON (this setting takes an array)"
    )
    env.setenv("MEDVLM_JOB__REPORTABLE_MODALITIES", '["CR", "DX"]')
    assert MedvlmSettings().job.reportable_modalities == ["CR", "DX"]


def test_the_allow_listed_variables_are_not_settings_and_pass(env: pytest.MonkeyPatch) -> None:
    assert not NOT_SETTINGS & set(setting_variables())
    for name in NOT_SETTINGS:
        env.setenv(name, "x")
    MedvlmSettings()
    assert _load_error(env, MEDVLM_TEST_RUNID="x") == (
        "MEDVLM_TEST_RUNID is not a setting; did you mean MEDVLM_TEST_RUN_ID?"
    )


# Names that look like variables but are values: the default AE titles in medvlm/settings.py.
_NOT_VARIABLES = {"MEDVLM_SCP", "MEDVLM_PACS"}


def test_every_medvlm_name_the_project_uses_is_a_setting_or_allow_listed() -> None:
    """Scripts, chart, flows, tests and docs: a variable they set or read must load."""
    found: set[str] = set()
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if (
            not path.is_file()
            or parts[0].startswith(".")
            or parts[0].endswith(".egg-info")
            or path.suffix not in {".py", ".sh", ".yaml", ".yml", ".md", ".toml", ".tpl", ""}
            or path.name in ("settings.py", Path(__file__).name)  # values; typos on purpose
        ):
            continue
        text = path.read_text(errors="replace")
        found.update(re.findall(r"\bMEDVLM_[A-Z0-9_]*[A-Z0-9]\b", text))
    assert {"MEDVLM_CODE_DIR", "MEDVLM_JOB__LEDGER_URL", "MEDVLM_TEST_RUN_ID"} <= found
    problems = variable_problems(dict.fromkeys(found - _NOT_VARIABLES))
    assert problems == []


def test_variables_from_an_env_file_are_checked_too(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dotenv = tmp_path / "site.env"
    dotenv.write_text("MEDVLM_JOB__MAX_ATTEMPTS=5\nMEDVLM_JOB__CONCURENCY=8\n")
    with pytest.raises(SettingsVariableError) as raised:
        MedvlmSettings(_env_file=dotenv)  # type: ignore[call-arg]
    assert str(raised.value) == (
        f"MEDVLM_JOB__CONCURENCY (in the env file {dotenv}) is not a setting; "
        "did you mean MEDVLM_JOB__CONCURRENCY?"
    )
    dotenv.write_text("MEDVLM_JOB__MAX_ATTEMPTS=5\n")
    assert MedvlmSettings(_env_file=dotenv).job.max_attempts == 5  # type: ignore[call-arg]
    assert MedvlmSettings.model_config.get("env_file") is None  # no .env is read by default


# -- one line for invalid settings ----------------------------------------------------------------


def _validation_line(env: pytest.MonkeyPatch, **variables: str) -> str:
    for name, value in variables.items():
        env.setenv(name, value)
    with pytest.raises(ValueError) as raised:
        MedvlmSettings()
    return describe_settings_error(raised.value)


@pytest.mark.parametrize(
    ("variables", "line"),
    [
        (
            {"MEDVLM_JOB__CONCURRENCY": "abc"},
            "MEDVLM_JOB__CONCURRENCY: Input should be a valid integer, unable to parse string "
            "as an integer",
        ),
        ({"MEDVLM_EHR__BASE_URL": "ftp://ehr"}, "MEDVLM_EHR__BASE_URL must be an http(s) URL"),
        (
            {"MEDVLM_PACS__CA_BUNDLE": "/nonexistent/ca.pem"},
            "MEDVLM_PACS__CA_BUNDLE /nonexistent/ca.pem is not a file",
        ),
        (
            {"MEDVLM_PACS__KIND": "dicomweb"},
            "MEDVLM_PACS__DICOMWEB_URL is required when MEDVLM_PACS__KIND is 'dicomweb'",
        ),
        (
            {"MEDVLM_SERVING__MIN_REPLICAS": "2"},
            "MEDVLM_SERVING__MIN_REPLICAS only apply with autoscaling: set "
            "MEDVLM_SERVING__MAX_REPLICAS too",
        ),
        (
            {"MEDVLM_FAIRNESS__RULES": '[{"name": "x", "metric": "failure_rate"}]'},
            "MEDVLM_FAIRNESS__RULES (item 0): alert rule 'x' has no threshold",
        ),
        (
            {"MEDVLM_JOB__PSEUDONYM_KEY": "short"},
            "MEDVLM_JOB__PSEUDONYM_KEY is shorter than 16 characters",
        ),
        (
            {"MEDVLM_JOB__PSEUDONYM_KEY_FILE": "/nonexistent/pseudonym.key"},
            "MEDVLM_JOB__PSEUDONYM_KEY_FILE unreadable: No such file or directory",
        ),
        (
            {
                "MEDVLM_JOB__PSEUDONYM_KEY": "0123456789abcdef-site",
                "MEDVLM_JOB__PSEUDONYM_KEY_FILE": "/etc/hostname",
            },
            "set MEDVLM_JOB__PSEUDONYM_KEY or MEDVLM_JOB__PSEUDONYM_KEY_FILE, not both",
        ),
    ],
)
def test_invalid_values_are_one_line_naming_the_variable(
    env: pytest.MonkeyPatch, variables: dict[str, str], line: str
) -> None:
    assert _validation_line(env, **variables) == line


def test_the_line_never_shows_a_value(env: pytest.MonkeyPatch) -> None:
    line = _validation_line(env, MEDVLM_SERVING__PORT="s3cret-value", MEDVLM_JOB__MAX_ATTEMPTS="0")
    assert "s3cret" not in line
    assert line == (
        "MEDVLM_SERVING__PORT: Input should be a valid integer, unable to parse string as an "
        "integer; MEDVLM_JOB__MAX_ATTEMPTS: Input should be greater than or equal to 1"
    )


@pytest.mark.parametrize(
    ("variables", "line"),
    [
        (
            {"MEDVLM_JOB__CONCURENCY": "8"},
            "invalid settings: MEDVLM_JOB__CONCURENCY is not a setting; did you mean "
            "MEDVLM_JOB__CONCURRENCY?",
        ),
        (
            {"MEDVLM_JOB__CONCURRENCY": "abc"},
            "invalid settings: MEDVLM_JOB__CONCURRENCY: Input should be a valid integer, unable "
            "to parse string as an integer",
        ),
        (
            {"MEDVLM_JOB__LEDGER_PASSWORD": "x", "MEDVLM_JOB__LEDGER_PASSWORD_FILE": "/f"},
            "invalid settings: set MEDVLM_JOB__LEDGER_PASSWORD or "
            "MEDVLM_JOB__LEDGER_PASSWORD_FILE, not both",
        ),
        (
            {"MEDVLM_JOB__LEDGER_PASSWORD": "x"},
            "invalid settings: MEDVLM_JOB__LEDGER_PASSWORD needs MEDVLM_JOB__LEDGER_URL (the "
            "database server)",
        ),
        (
            {"MEDVLM_JOB__LEDGER_PASSWORD_FILE": "/nonexistent/ledger-password"},
            "invalid settings: MEDVLM_JOB__LEDGER_PASSWORD_FILE unreadable: No such file or "
            "directory",
        ),
        (  # neither password is shown
            {
                "MEDVLM_JOB__LEDGER_URL": "postgresql+psycopg://u:old@db/l",
                "MEDVLM_JOB__LEDGER_PASSWORD": "new",
            },
            "invalid settings: MEDVLM_JOB__LEDGER_URL holds a password and "
            "MEDVLM_JOB__LEDGER_PASSWORD is set: give it once",
        ),
    ],
)
def test_medvlm_run_ends_with_one_line_and_exit_code_2(
    env: pytest.MonkeyPatch, variables: dict[str, str], line: str
) -> None:
    for name, value in variables.items():
        env.setenv(name, value)
    env.setenv("COLUMNS", "60")  # narrower than the line: it must not wrap
    result = CliRunner().invoke(app, ["run", "--since", "2026-11-01"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [line]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--since", "2026-13-01"], "error: --since '2026-13-01' is not a date (YYYY-MM-DD)"),
        (["--until", "yesterday"], "error: --until 'yesterday' is not a date (YYYY-MM-DD)"),
        (
            ["--since", "2026-11-02", "--until", "2026-11-01"],
            "error: --since 2026-11-02 is after --until 2026-11-01",
        ),
    ],
)
def test_a_bad_date_option_is_one_line_naming_the_option(
    env: pytest.MonkeyPatch, args: list[str], line: str
) -> None:
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 2
    assert result.output.splitlines() == [line]


def test_the_pseudonym_key_comes_from_its_file_and_is_read_again_each_time(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "pseudonym.key"
    key_file.write_text("first-site-secret-0123\n")
    env.setenv("MEDVLM_JOB__PSEUDONYM_KEY_FILE", str(key_file))
    job = MedvlmSettings().job
    assert job.pseudonym_key_bytes() == b"first-site-secret-0123"
    key_file.write_text("rotated-site-secret-4567")  # a Kubernetes Secret updated in place
    assert job.pseudonym_key_bytes() == b"rotated-site-secret-4567"
    assert "secret" not in repr(job) and "secret" not in job.model_dump_json()


def test_medvlm_ref_prints_the_reference_messages_use_keyed_with_the_site_key(
    env: pytest.MonkeyPatch,
) -> None:
    from connectors.ehr import identifier_ref

    env.setenv("MEDVLM_EHR__ACCESSION_SYSTEM", "urn:site:accession")
    plain = CliRunner().invoke(app, ["ref"], input="ACC-778899\n")
    assert plain.exit_code == 0, plain.output
    assert plain.output.splitlines()[-1] == identifier_ref("ACC-778899", "urn:site:accession")
    env.setenv("MEDVLM_JOB__PSEUDONYM_KEY", "site-secret-0123456789")
    keyed = CliRunner().invoke(app, ["ref", "--system", "urn:site:mrn"], input="MRN-1\n")
    assert keyed.exit_code == 0, keyed.output
    expected = identifier_ref("MRN-1", "urn:site:mrn", key=b"site-secret-0123456789")
    assert keyed.output.splitlines()[-1] == expected
    assert "MRN-1" not in keyed.output and "ACC-778899" not in plain.output  # not echoed


def test_the_ledger_password_is_set_into_the_url_escaped_and_never_shown(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sqlalchemy.engine import make_url

    secret = tmp_path / "ledger-password"
    secret.write_text("p@ss:w/rd%#?\n")  # a mounted Secret, newline included
    env.setenv("MEDVLM_JOB__LEDGER_URL", "postgresql+psycopg://ledger@db.hospital:5432/medvlm")
    env.setenv("MEDVLM_JOB__LEDGER_PASSWORD_FILE", str(secret))
    settings = MedvlmSettings()
    assert settings.job.ledger_url is not None
    url = make_url(settings.job.ledger_url)
    assert (url.username, url.password, url.host, url.database) == (
        "ledger",
        "p@ss:w/rd%#?",
        "db.hospital",
        "medvlm",
    )
    shown = CliRunner().invoke(app, ["settings"])
    assert shown.exit_code == 0, shown.output
    assert "postgresql+psycopg://ledger:***@db.hospital:5432/medvlm" in shown.output
    assert "p@ss" not in shown.output and "p%40ss" not in shown.output
    # Validated again from its own dump (as a copy of the settings is): the same URL.
    assert MedvlmSettings.model_validate(settings.model_dump()).job.ledger_url == str(
        settings.job.ledger_url
    )
