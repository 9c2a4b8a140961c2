"""ACL users and TLS against redis-servers started here: ``status``, ``trigger`` and a
burst worker work end to end with the right REDIS_URL, and a wrong one fails with
one line (exit 3) that never shows the password."""

from __future__ import annotations

import os
import re
import uuid
from typing import Iterator

import pytest
from redis import Redis

from tests.support.helpers import run_cli
from tests.support.redis_servers import (
    ACL_USER,
    DAY,
    Certs,
    Server,
    ServerFailed,
    Servers,
    batch_env,
    burst_worker,
    make_certs,
    one_line_error,
    run_whole_batch,
    start_acl_server,
    start_tls_server,
)

NO_TLS_BUILD = re.compile(r"(?i)not supported|bad directive|built without|unrecognized")
PASSWORD = "pw-" + uuid.uuid4().hex  # unique, so finding it in any output is never a coincidence


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with Servers() as owned:
        yield owned


@pytest.fixture(scope="module")
def acl_server(servers: Servers) -> Server:
    return start_acl_server(servers, PASSWORD)


@pytest.fixture(scope="module")
def certs(servers: Servers) -> Certs:
    return make_certs(servers.root / "certs")


@pytest.fixture(scope="module")
def tls_server(servers: Servers, certs: Certs) -> Server:
    try:
        return start_tls_server(servers, certs)
    except ServerFailed as failure:
        # A redis-server built without TLS rejects the tls-* options at start-up; any
        # other failure (a bad certificate, a busy port) is a real one.
        if NO_TLS_BUILD.search(failure.log):
            reason = (f"{servers.binary} has no TLS support ({failure.log.strip().splitlines()[-1]}); "
                      "install Debian's redis-server (apt-get install redis-server), as .ci/run does")
            if os.environ.get("CI"):  # CI must test TLS, not skip it
                pytest.fail(reason)
            pytest.skip(reason)
        raise


# -- ACL ------------------------------------------------------------------------------


def test_an_acl_user_with_a_password_runs_trigger_worker_and_status(acl_server: Server) -> None:
    env = batch_env(f"redis://{ACL_USER}:{PASSWORD}@127.0.0.1:{acl_server.port}/0")
    with Redis(port=acl_server.port, username=ACL_USER, password=PASSWORD) as client:
        outputs = run_whole_batch(env, client)
    for result in outputs:
        assert PASSWORD not in result.stdout + result.stderr


def test_no_credentials_when_the_default_user_is_disabled_is_refused(acl_server: Server) -> None:
    env = batch_env(f"redis://127.0.0.1:{acl_server.port}/0")
    line = one_line_error(run_cli(["status", "--date", DAY], env))
    assert "refused" in line and "no credentials" in line, line
    assert "refused" in one_line_error(burst_worker(env))


def test_a_wrong_password_is_one_line_and_never_printed(acl_server: Server) -> None:
    wrong = "wrong-" + uuid.uuid4().hex
    env = batch_env(f"redis://{ACL_USER}:{wrong}@127.0.0.1:{acl_server.port}/0")
    for result in (run_cli(["status", "--date", DAY], env), run_cli(["trigger", "--date", DAY], env),
                   burst_worker(env)):
        line = one_line_error(result)
        assert "refused the credentials" in line and f"{ACL_USER}:***@" in line, line
        assert wrong not in result.stdout + result.stderr
        assert PASSWORD not in result.stdout + result.stderr


# -- TLS ------------------------------------------------------------------------------


def test_trigger_worker_and_status_over_tls(tls_server: Server, certs: Certs) -> None:
    env = batch_env(f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={certs.ca}")
    with Redis(port=tls_server.port, ssl=True, ssl_ca_certs=str(certs.ca)) as client:
        run_whole_batch(env, client)


def test_a_server_certificate_from_another_ca_is_one_line(tls_server: Server, certs: Certs) -> None:
    env = batch_env(f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={certs.other_ca}")
    for result in (run_cli(["status", "--date", DAY], env), burst_worker(env)):
        line = one_line_error(result)
        assert "TLS" in line and "CERTIFICATE_VERIFY_FAILED" in line and "ssl_ca_certs" in line, line
