"""Issue 17 item 8: the simulator's operator endpoints (``/_sim/*``, which can make every call
fail) need the admin token when one is set or when the simulator listens beyond loopback.

Real `sumstream llm-sim` processes started by the harness; no Kafka needed.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.harness import Stack

pytestmark = pytest.mark.integration

TOKEN = "sim-admin-secret"
MESSAGE = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "One sentence to summarize. And another one."}],
}


def test_with_an_admin_token_set_sim_endpoints_need_it(tmp_path: Path) -> None:
    stack = Stack(tmp_path, extra_env={"SUMSTREAM_SIM_ADMIN_TOKEN": TOKEN})
    try:
        stack.start_simulator()
        url = stack.sim_url
        anonymous = httpx.post(f"{url}/_sim/config", json={"fail_all": True}, timeout=5)
        assert anonymous.status_code == 401, anonymous.text
        assert anonymous.headers["www-authenticate"] == "Bearer"
        wrong = httpx.get(f"{url}/_sim/stats", headers={"Authorization": "Bearer nope"}, timeout=5)
        assert wrong.status_code == 401
        assert httpx.post(f"{url}/_sim/reset", timeout=5).status_code == 401
        # The refused fail_all did not take: calls still succeed.
        answer = httpx.post(f"{url}/v1/messages", json=MESSAGE, headers={"x-api-key": "k"})
        assert answer.status_code == 200, answer.text
        assert stack.sim_config(fail_all=True)["fail_all"] is True  # the harness sends the token
        assert stack.sim_stats()["attempts"] >= 1
    finally:
        stack.stop()


def test_beyond_loopback_without_a_token_sim_endpoints_are_off(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.start_simulator(host="0.0.0.0")
        url = stack.sim_url
        refused = httpx.post(f"{url}/_sim/config", json={"fail_all": True}, timeout=5)
        assert refused.status_code == 403, refused.text
        assert "SUMSTREAM_SIM_ADMIN_TOKEN" in refused.json()["error"]["message"]
        assert httpx.get(f"{url}/_sim/config", timeout=5).status_code == 403
        # The model API itself still answers.
        answer = httpx.post(f"{url}/v1/messages", json=MESSAGE, headers={"x-api-key": "k"})
        assert answer.status_code == 200, answer.text
    finally:
        stack.stop()


def test_on_loopback_without_a_token_sim_endpoints_stay_open(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.start_simulator()
        assert stack.sim_config(ttft_ms=5)["ttft_ms"] == 5
    finally:
        stack.stop()
