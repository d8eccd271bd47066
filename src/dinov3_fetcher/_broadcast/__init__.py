"""Share the teacher's bytes between nodes over torch.distributed: rank 0 sends, the other nodes relay and receive.

The sender (global rank 0, which downloads from the source) and the receivers (the leader of every other node)
call ``sender.send`` / ``receiver.receive`` together on a gloo group of their own (``wire.leaders_group``),
whatever the job's backend is. Four steps. The control goes through the sender, point to point, so a dead
sender is seen by every receiver at once and a dead receiver by the sender; the data goes along a chain:

1. the sender sends every receiver the file list (name, size, sha256), a small ``meta`` dict (the manifest's
   commit, source...) and the piece size, so the receivers never ask the source anything;
2. every receiver announces the byte ranges it misses per file (``Sink.missing``; a warm node: none); the sender
   orders the chain (the receivers that miss more first; one that misses nothing is not in it) and tells
   everyone;
3. the data (``relay``): the sender sends every piece some receiver misses once, to the chain's first member,
   with a header (kind, file, offset, length, and how far down the chain the piece is needed); each member
   writes the part it misses (a thread writes and hashes while the next piece arrives) and passes the piece on
   while it receives the next one. A piece leaves the sender once the source's ``ready`` frontier has passed
   its end, so the nodes get a file while rank 0 is still downloading it. Every link carries the checkpoint at
   most once: the sender's egress is S, not (N - 1) x S, and the job takes about S / B plus one piece per hop.
   Memory: a few pieces per rank (``relay.POOL`` x ``wire.PIECE``);
4. every receiver sends the sender its outcome and stats; the sender sends back one verdict: the lowest failing
   rank's error, raised on every member (same type, message and hint), or the same ``Report`` for every member.

A receiver whose sink fails (disk full) or whose file fails its sha256 keeps relaying (writing nothing more), so
the others still get their copy and the error reaches every rank. What a sink wrote stays recorded
(``Sink.close``), so the next run resumes it, unless the sender's own source failed its sha256
(``IntegrityError``): its abort header then says ``DROP`` and which file, and each sink drops what it holds of
that file (of every unfinished file, when the error names none). A member
that dies (a killed process, a lost node) is seen by its neighbours as a reset: the one after it passes an abort
down the chain, the one before it stops passing pieces on but keeps receiving, and both tell the sender at once
(``receiver``), as does the dead member's own control connection (``sender.Inbox``). The sender then stops: an
abort goes down the chain, rank 0's own download is cancelled (it resumes on the next run), and every surviving
member raises the same ``NetworkError`` (``BROKEN``). A node that vanishes without a reset is seen only after
the group's timeout. A member that is interrupted (Ctrl-C) tells the sender at once (``receiver.Stop``) and keeps
relaying until the sender's abort reaches it; every member raises its ``FetchInterrupted``.

NCCL (GPU tensors) is not used here; see docs/multi-node.md for how the data step would ride on it.
"""
