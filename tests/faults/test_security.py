"""R-37: TLS and ACL users from the URL, tenants kept apart, secrets kept out of logs.

Debian's redis-server speaks only TLS here, with a CA made in the test, and has two
ACL users confined to ``appA:*`` and ``appB:*``. Every run's arguments and results
hold a marker secret; logging is at DEBUG throughout. R-38 (the embedded server)
is in test_embedded.py.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING

import anyio
import pytest

from werkfluss import (
    Settings,
    StorageError,
    get_events_async,
    get_run_async,
    invoke_hook_async,
    list_runs_async,
    start_async,
    step,
    workflow,
)
from werkfluss._store._open import close_stores

from ..helpers import run_cli
from ..servers import add_acl_user, require_binary, tls_redis

if TYPE_CHECKING:
    from pathlib import Path

SECRET = "WF-SECRET-91c4e2"
PASSWORDS = ("pw-A-Zq81x", "pw-B-Kk27y", "admin-pw-Jt55")


@step(name="sec.lookup")
async def lookup(token: str) -> str:
    return f"profile-of-{token}"  # carries the secret into the result


@workflow(name="sec.signup")
async def signup(token: str) -> str:
    profile = await lookup(token)
    return profile.upper()


def with_ca(url: str, ca: Path) -> str:
    return f"{url}/0?ssl_ca_certs={ca}"


async def test_tls_acl_tenants_and_secrets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_binary("redis-server")
    caplog.set_level(logging.DEBUG)
    with tls_redis(tmp_path, password=PASSWORDS[2]) as server:
        ca = server.ca_file
        url_a = add_acl_user(server.url, "appA", PASSWORDS[0], "appA:", ssl_ca_certs=str(ca))
        url_b = add_acl_user(server.url, "appB", PASSWORDS[1], "appB:", ssl_ca_certs=str(ca))
        app_a = Settings(redis_url=with_ca(url_a, ca), prefix="appA:")
        app_b = Settings(redis_url=with_ca(url_b, ca), prefix="appB:")
        texts: list[str] = []  # every exception text and command output, scanned at the end
        try:
            # Both apps work over TLS with their own users.
            assert (
                await start_async(signup.options(run_id="a-1", settings=app_a), SECRET)
                == f"PROFILE-OF-{SECRET}".upper()
            )
            assert (
                await start_async(signup.options(run_id="b-1", settings=app_b), SECRET)
                == f"PROFILE-OF-{SECRET}".upper()
            )
            b_before = await get_events_async("b-1", settings=app_b)

            # App A pointed at B's prefix: refused by the server, nothing of B's read or changed.
            a_on_b = Settings(redis_url=app_a.redis_url, prefix="appB:")
            for attempt in (
                lambda: start_async(signup.options(run_id="b-1", settings=a_on_b), SECRET),
                lambda: start_async(signup.options(run_id="a-evil", settings=a_on_b), SECRET),
                lambda: get_run_async("b-1", settings=a_on_b),
                lambda: list_runs_async(settings=a_on_b),
                lambda: invoke_hook_async("anything", 1, settings=a_on_b),
            ):
                with pytest.raises(StorageError, match="no permissions") as refused:
                    await attempt()
                texts.append(str(refused.value))
            assert await get_events_async("b-1", settings=app_b) == b_before
            assert [r.run_id for r in (await list_runs_async(settings=app_b)).runs] == ["b-1"]

            # A wrong CA and a wrong password fail fast, with the URL's password hidden.
            other_ca = tmp_path / "other"
            other = tls_redis(other_ca)  # only for its CA: a CA the server's certificate is not signed by
            other.stop()
            for settings in (
                Settings(redis_url=with_ca(url_a, other.ca_file), prefix="appA:"),
                Settings(redis_url=with_ca(url_a.replace(PASSWORDS[0], "wrong-" + PASSWORDS[0]), ca), prefix="appA:"),
            ):
                with anyio.fail_after(30), pytest.raises(StorageError) as failed:
                    await get_run_async("a-1", settings=settings)
                message = str(failed.value)
                assert "***" in message and "127.0.0.1" in message, message
                texts.append(message)
        finally:
            await close_stores()

        # The command line over TLS as app A: tables only, nothing of the run's values.
        env = {k: v for k, v in os.environ.items() if not k.startswith("WERKFLUSS_")}
        env.update(WERKFLUSS_REDIS_URL=app_a.redis_url or "", WERKFLUSS_PREFIX="appA:")
        for args in (("runs", "list"), ("runs", "show", "a-1"), ("hooks", "list"), ("dead", "list")):
            done = await run_cli(*args, env=env)
            assert done.returncode == 0, done.stderr
            texts += [done.stdout, done.stderr]
        refused_cli = await run_cli("runs", "show", "b-1", "--prefix", "appB:", env=env)
        assert refused_cli.returncode == 1 and "no permissions" in refused_cli.stderr
        texts.append(refused_cli.stderr)

    logged = [record.getMessage() for record in caplog.records] + [
        str(record.exc_info[1]) for record in caplog.records if record.exc_info
    ]
    assert any(record.name == "werkfluss" for record in caplog.records)  # DEBUG logging really was on
    for text in logged + texts:
        assert SECRET not in text and SECRET.upper() not in text, text
        for password in PASSWORDS:
            assert password not in text, text
    assert any(re.search(r"step #1 sec\.lookup executed", text) for text in logged)
