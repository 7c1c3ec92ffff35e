"""The consume loop reads a delivery count from the ack subject as nats-py's metadata does."""

from __future__ import annotations

import nats.errors
import pytest
from nats.aio.msg import Msg

from shoal.bus import _num_delivered

REPLIES = [
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>
    "$JS.ACK.t1_EXEC.workers.3.120.77.1700000000000000000.5",
    # $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>.<token>
    "$JS.ACK.hub.ACCHASH.t1_EXEC.workers.7.120.77.1700000000000000000.0.a1b2",
    "$JS.ACK._.ACCHASH.EXEC.workers.1.1.1.1700000000000000000.0",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_num_delivered_matches_nats_py_metadata(reply: str) -> None:
    msg = Msg(_client=None, subject="s", reply=reply)  # type: ignore[arg-type]
    assert _num_delivered(msg) == Msg(_client=None, reply=reply).metadata.num_delivered  # type: ignore[arg-type]


@pytest.mark.parametrize("reply", ["", "_INBOX.abc", "$JS.ACK.too.short"])
def test_not_an_ack_subject_raises_like_nats_py(reply: str) -> None:
    with pytest.raises(nats.errors.Error):
        _num_delivered(Msg(_client=None, reply=reply))  # type: ignore[arg-type]
