"""The journal keeps what typed answers, conversations and dashboard questions add: a
revived request has its format, conversation and retained reply again."""

from __future__ import annotations

from daemon.journal.journal import Journal
from daemon.scheduler import Job
from protocol.payloads import AskRequest
from protocol.requests import Reply


def test_a_revived_dashboard_question_keeps_its_retained_reply_and_typed_fields(tmp_path):
    path = tmp_path / "dev.journal"
    request = AskRequest.model_validate({"id": "d1", "text": "Is the gate open?", "camera": "gate", "stream": False,
                                         "conversation": "gate-chat", "format": {"enum": ["open", "shut"]}})
    job = Job("ask", "d1", 0.0, camera="gate", request=request,
              reply=Reply("vlmd/x/dashboard/gate/answer", None, stream=False, retain=True))
    journal = Journal(path, wall_clock=lambda: 1000.0)
    assert journal.recover().pending == []  # opens the file
    journal.accepted(job, 1000.0, None)
    journal.close()
    again = Journal(path, wall_clock=lambda: 1000.0)
    try:
        [pending] = again.recover().pending
    finally:
        again.close()
    assert pending.reply == Reply("vlmd/x/dashboard/gate/answer", None, False, retain=True)
    revived = AskRequest.model_validate(pending.request)
    assert revived.format == {"enum": ["open", "shut"]} and revived.conversation == "gate-chat"
