"""Options (`werkfluss._options`): retry policies, step options, connection settings."""

from __future__ import annotations

import math
import re

import msgspec
import pytest

from werkfluss import ConfigurationError, RetryPolicy, Settings
from werkfluss._options import StepOptions, step_options

ENV_VARS = (
    "WERKFLUSS_REDIS_URL", "WERKFLUSS_DIR", "WERKFLUSS_PREFIX", "WERKFLUSS_FSYNC", "WERKFLUSS_LEASE",
    "WERKFLUSS_MAX_PAYLOAD", "WERKFLUSS_HISTORY_WARNING", "WERKFLUSS_MAX_HISTORY", "WERKFLUSS_HOLD",
    "WERKFLUSS_SETTLE",
)  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No WERKFLUSS_* variable from the outer environment leaks into a test."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- RetryPolicy ---------------------------------------------------------------------------------------------------


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert policy.retries == 0
    assert policy.backoff == "exponential"
    assert policy.base == 1.0
    assert policy.max_delay == 60.0
    assert policy.retry_on == (Exception,)


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        ("exponential", [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]),
        ("linear", [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]),
        ("constant", [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
    ],
)
def test_delays_by_backoff(backoff: str, expected: list[float]) -> None:
    policy = msgspec.convert({"retries": 6, "backoff": backoff, "base": 0.5}, RetryPolicy)
    assert [policy.delay(n) for n in range(1, 7)] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("backoff", "failures", "expected"),
    [
        ("exponential", 1, 3.0),
        ("exponential", 2, 5.0),
        ("exponential", 30, 5.0),
        ("linear", 1, 3.0),
        ("linear", 2, 5.0),
        ("linear", 1000, 5.0),
        ("constant", 1, 5.0),
    ],
)
def test_delays_are_capped_by_max_delay(backoff: str, failures: int, expected: float) -> None:
    base = 5.0 if backoff == "constant" else 3.0
    policy = msgspec.convert({"backoff": backoff, "base": base, "max_delay": 5.0}, RetryPolicy)
    assert policy.delay(failures) == pytest.approx(expected)


def test_zero_delays_are_allowed() -> None:
    assert RetryPolicy(retries=5, base=0.0).delay(3) == 0.0
    assert RetryPolicy(retries=5, base=1.0, max_delay=0.0).delay(3) == 0.0


@pytest.mark.parametrize("base", [1.0, 0.0, 1e-9])
def test_exponential_delay_stays_capped_after_many_failures(base: float) -> None:
    policy = RetryPolicy(retries=1440, base=base, max_delay=60.0)
    assert policy.delay(1440) == min(60.0, policy.delay(1440))
    assert 0.0 <= policy.delay(1440) <= 60.0


def test_exponential_delay_is_capped_up_to_a_thousand_failures() -> None:
    policy = RetryPolicy(retries=1000, max_delay=60.0)
    assert policy.delay(1000) == 60.0


def test_retries_on_default_is_every_exception_but_not_base_exceptions() -> None:
    policy = RetryPolicy(retries=1)
    assert policy.retries_on(ValueError())
    assert policy.retries_on(TimeoutError())
    assert not policy.retries_on(KeyboardInterrupt())
    assert not policy.retries_on(SystemExit())


def test_retries_on_only_the_listed_types_and_their_subclasses() -> None:
    policy = RetryPolicy(retries=2, retry_on=(ConnectionError, TimeoutError))
    assert policy.retries_on(ConnectionResetError())  # a subclass of ConnectionError
    assert policy.retries_on(TimeoutError())
    assert not policy.retries_on(ValueError())
    assert not policy.retries_on(OSError())  # a base class is not retried


@pytest.mark.parametrize("retries", [-1, -100])
def test_negative_retries_are_rejected(retries: int) -> None:
    with pytest.raises(ConfigurationError, match=f"retries must be >= 0, got {retries}"):
        RetryPolicy(retries=retries)


@pytest.mark.parametrize("field", ["base", "max_delay"])
def test_negative_delays_are_rejected(field: str) -> None:
    with pytest.raises(ConfigurationError, match="delays must be >= 0"):
        msgspec.convert({field: -0.1}, RetryPolicy)


def test_unknown_backoff_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="unknown backoff 'fibonacci'"):
        RetryPolicy(backoff="fibonacci")  # type: ignore[arg-type]


def test_retry_policy_is_frozen_and_keyword_only() -> None:
    policy = RetryPolicy(retries=2)
    with pytest.raises(AttributeError):
        policy.retries = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        RetryPolicy(2)  # type: ignore[call-arg]


# --- step_options --------------------------------------------------------------------------------------------------


def test_step_options_from_a_retry_count() -> None:
    options = step_options(3, None)
    assert options == StepOptions(retry=RetryPolicy(retries=3), timeout=None)


def test_step_options_keep_a_given_policy() -> None:
    policy = RetryPolicy(retries=4, backoff="linear", base=0.25)
    options = step_options(policy, 2.5)
    assert options.retry is policy
    assert options.timeout == 2.5


def test_step_options_defaults() -> None:
    assert StepOptions() == StepOptions(retry=RetryPolicy(), timeout=None)


@pytest.mark.parametrize("timeout", [0, 0.0, -1, -0.001])
def test_non_positive_timeout_is_rejected(timeout: float) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f"timeout must be > 0 seconds, got {timeout}")):
        step_options(0, timeout)


def test_negative_retries_via_step_options_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="retries must be >= 0"):
        step_options(-1, None)


@pytest.mark.parametrize("what", ["timeout", "base", "max_delay"])
def test_nan_durations_are_rejected(what: str) -> None:
    with pytest.raises(ConfigurationError):
        if what == "timeout":
            step_options(0, math.nan)
        else:
            msgspec.convert({what: math.nan}, RetryPolicy)


# --- Settings ------------------------------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    settings = Settings()
    assert settings.redis_url is None
    assert settings.directory == ".werkfluss"
    assert settings.prefix == "werkfluss:"
    assert settings.fsync == "everysec"
    assert settings.lease == 10.0


def test_settings_are_hashable_values() -> None:
    """The client keys its connection cache on Settings."""
    first = Settings(redis_url="redis://localhost:6379/0", prefix="a:")
    second = Settings(redis_url="redis://localhost:6379/0", prefix="a:")
    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second, Settings(prefix="b:")}) == 2


@pytest.mark.parametrize("fsync", ["everysec", "always"])
def test_valid_fsync(fsync: str) -> None:
    assert msgspec.convert({"fsync": fsync}, Settings).fsync == fsync


@pytest.mark.parametrize("fsync", ["no", "Always", ""])
def test_invalid_fsync_is_rejected(fsync: str) -> None:
    with pytest.raises(ConfigurationError, match="fsync must be 'everysec' or 'always'"):
        Settings(fsync=fsync)  # type: ignore[arg-type]


@pytest.mark.parametrize("lease", [0.5, 1, 10.0, 3600.0])
def test_valid_lease(lease: float) -> None:
    assert Settings(lease=lease).lease == lease


@pytest.mark.parametrize("lease", [0.49, 0.0, -1.0])
def test_short_lease_is_rejected(lease: float) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f"lease must be >= 0.5 seconds, got {lease}")):
        Settings(lease=lease)


@pytest.mark.parametrize("lease", [math.nan, math.inf])
def test_non_finite_lease_is_rejected(lease: float) -> None:
    with pytest.raises(ConfigurationError):
        Settings(lease=lease)


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "{tag}:"])
def test_invalid_prefix_is_rejected(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid key prefix") as info:
        Settings(prefix=prefix)
    assert repr(prefix) in str(info.value)


def test_prefix_may_be_anything_else() -> None:
    assert Settings(prefix="app:v2:").prefix == "app:v2:"


# --- Settings.from_env ---------------------------------------------------------------------------------------------


def test_from_env_without_variables_gives_defaults(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings.from_env() == Settings()


def test_from_env_reads_every_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WERKFLUSS_REDIS_URL", "redis://user:pw@cache:6380/2")
    clean_env.setenv("WERKFLUSS_DIR", "/var/lib/werkfluss")
    clean_env.setenv("WERKFLUSS_PREFIX", "shop:")
    clean_env.setenv("WERKFLUSS_FSYNC", "always")
    clean_env.setenv("WERKFLUSS_LEASE", "2.5")
    assert Settings.from_env() == Settings(
        redis_url="redis://user:pw@cache:6380/2", directory="/var/lib/werkfluss", prefix="shop:", fsync="always",
        lease=2.5,
    )  # fmt: skip


def test_from_env_ignores_empty_variables(clean_env: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        clean_env.setenv(name, "")
    assert Settings.from_env() == Settings()


def test_from_env_lease_accepts_integers(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WERKFLUSS_LEASE", "30")
    assert Settings.from_env().lease == 30.0


@pytest.mark.parametrize("value", ["ten", "10s", "1,5"])
def test_from_env_bad_lease_names_the_variable(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("WERKFLUSS_LEASE", value)
    with pytest.raises(ConfigurationError, match="WERKFLUSS_LEASE") as info:
        Settings.from_env()
    assert repr(value) in str(info.value)


def test_from_env_too_short_lease_is_rejected(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WERKFLUSS_LEASE", "0.1")
    with pytest.raises(ConfigurationError, match=re.escape("lease must be >= 0.5")):
        Settings.from_env()


def test_from_env_bad_fsync_is_rejected(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WERKFLUSS_FSYNC", "sometimes")
    with pytest.raises(ConfigurationError, match="sometimes"):
        Settings.from_env()


def test_from_env_bad_prefix_is_rejected(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WERKFLUSS_PREFIX", "{shop}:")
    with pytest.raises(ConfigurationError, match="invalid key prefix"):
        Settings.from_env()


def test_keyword_overrides_win(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WERKFLUSS_REDIS_URL", "redis://env:6379/0")
    clean_env.setenv("WERKFLUSS_PREFIX", "env:")
    clean_env.setenv("WERKFLUSS_LEASE", "20")
    settings = Settings.from_env(redis_url="redis://kw:6379/1", lease=5)
    assert settings.redis_url == "redis://kw:6379/1"
    assert settings.lease == 5.0
    assert settings.prefix == "env:"  # not overridden


def test_none_overrides_are_ignored(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WERKFLUSS_REDIS_URL", "redis://env:6379/0")
    clean_env.setenv("WERKFLUSS_DIR", "/data")
    settings = Settings.from_env(redis_url=None, directory=None, prefix=None, fsync=None, lease=None)
    assert settings.redis_url == "redis://env:6379/0"
    assert settings.directory == "/data"
    assert settings == Settings(redis_url="redis://env:6379/0", directory="/data")


def test_overrides_are_validated(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=re.escape("lease must be >= 0.5")):
        Settings.from_env(lease=0.1)
    with pytest.raises(ConfigurationError, match="invalid werkfluss settings"):
        Settings.from_env(lease="long")
    with pytest.raises(ConfigurationError, match="invalid key prefix"):
        Settings.from_env(prefix="{x}")


def test_override_can_replace_a_bad_environment_value(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WERKFLUSS_FSYNC", "always")
    assert Settings.from_env(fsync="everysec").fsync == "everysec"


def test_unknown_override_is_rejected(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises((ConfigurationError, TypeError)):
        Settings.from_env(redis_ulr="redis://typo:6379/0")
