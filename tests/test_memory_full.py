"""Redis out of memory (maxmemory + noeviction), with real processes: three nodes, a
scheduler and a worker each, a private redis-server, and a webhook receiver in the test.

Issue 19, item 1 and test (a): memory is reached in the middle of the leader's fan-out
(tests/memory_tasks.py: two days, two transactions; the first fits, the second is
refused), then Redis stays full while the first day's runs execute. No process exits,
each logs one line naming Redis's memory, a leader is held, ``health`` fails naming the
memory, ``status --json`` says ``redis.full``, ``redis_full`` reaches the webhook; once
maxmemory is raised every run of both days finishes, once, and the refused slot is
fanned out past its misfire grace and says so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from redis import Redis

from dailyq.keys import Keys
from dailyq.redis_memory import read_memory
from dailyq.redis_server import PrivateRedis
from tests.helpers import ROOT, base_env, executions, run_cli, wait_for
from tests.memory_tasks import EAST, WEST
from tests.webhook_receiver import WebhookReceiver

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
            "from dailyq.fanout import fan_out; from dailyq.keys import Keys; from dailyq.rq_seam import make_queue\n"
            "from dailyq.redis_server import PrivateRedis; from dailyq.runs import runs_on; from dailyq.table import "
            "load_table; import tests.memory_tasks as mt\n"
            "table = load_table('tests.memory_tasks')\n"
            "with PrivateRedis(appendonly=False) as s:\n"
            "    r = Redis.from_url(s.url); k = Keys('m'); before = r.info('memory')['used_memory']\n"
            "    fan_out(r, k, make_queue(r, k), runs_on(table, date.fromisoformat(mt.day_of(mt.EAST)), ['east']),"
            " retention_s=60)\n"
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


def test_memory_full_mid_fan_out_on_three_nodes_is_survived_and_reported(processes, redis_server, webhook):
    prefix = "memfull"
    keys = Keys(prefix)
    fire_at = time.time() + 10
    with PrivateRedis(appendonly=False, extra_args=["--maxmemory-policy", "noeviction"]) as own:
        env = base_env(own.url, prefix, DAILYQ_TASKS="tests.memory_tasks", MEM_FIRE_AT=str(round(fire_at)),
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
