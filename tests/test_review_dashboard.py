"""Review of issue 16 (the dashboard): two bugs, proven here. FAILING on purpose until fixed.

1. DNS rebinding: the default dashboard (loopback, no token) answers any ``Host``. A page on
   ``http://rebind.attacker.example:8787`` whose name is rebound to 127.0.0.1 is same-origin
   with the dashboard in the victim's browser: it reads every page (task arguments, results)
   and, with the CSRF token read from a form and ``Origin`` equal to its own host, acts.
2. A credential cut by the listing's 120-character truncation is not redacted: the truncation
   runs before the redaction, so the first part of the secret is shown.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.testclient import TestClient

from omniq.backend.file import FileBackend
from omniq.backend.file.dashboard import create_app
from omniq.core import _redact
from omniq.core.models import TaskStatus

HTML = {"accept": "text/html"}
BURST: dict[str, Any] = {"burst": True, "idle_timeout": 0.3, "poll": 0.1}
ATTACKER = "rebind.attacker.example:8787"


def test_a_rebound_host_name_can_neither_read_nor_act() -> None:
    with FileBackend(f"memory://review16-{uuid.uuid4().hex}", events=True) as backend:
        dead = backend.enqueue("worker_tasks:always_fail", ["private-argument"], queue="work")
        backend.worker(["work"], **BURST).run()
        assert backend.get_task(dead).status is TaskStatus.DEAD
        app = create_app(backend)  # the default: what `omniq dashboard DIR` serves
        with TestClient(app, base_url=f"http://{ATTACKER}") as c:
            page = c.get("/dead", headers=HTML)
            token = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
            acted = c.post(
                "/actions/delete",
                data={"queue": "work", "task_id": dead, "csrf": token.group(1) if token else ""},
                headers={"origin": f"http://{ATTACKER}"},
                follow_redirects=False,
            )
        assert "private-argument" not in page.text, "a foreign Host reads the task arguments"
        assert acted.status_code >= 400, "a foreign Host deleted a dead letter"
        assert backend.get_task(dead).status is TaskStatus.DEAD


def test_a_credential_cut_by_the_listing_truncation_is_still_hidden() -> None:
    secret = "review16-secret-Zq8Xw3Lm9"
    _redact.register([secret])
    with FileBackend(f"memory://review16-{uuid.uuid4().hex}") as backend:
        # json.dumps(["x" * 100, secret]): the secret starts at character 106 of 130.
        backend.enqueue("worker_tasks:add", ["x" * 100, secret], queue="inbox")
        with TestClient(create_app(backend), base_url="http://127.0.0.1:8787") as c:
            page = c.get("/queues/inbox?status=pending", headers=HTML).text
    assert "xxxx" in page  # the arguments are shown (truncated)
    assert secret[:10] not in page, "the first part of a registered secret is shown"
