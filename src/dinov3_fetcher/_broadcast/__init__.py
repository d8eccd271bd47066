"""Share the teacher's bytes between nodes over torch.distributed: one sender, the other nodes receive.

The sender (global rank 0, which downloads from the source) and the receivers (local rank 0 of every other
node) call ``send`` / ``receive`` together on a gloo group of their own (``leaders_group``), whatever the job's
backend is. Four steps; every message goes between the sender and one receiver (point to point), so a dead
sender is seen by every receiver at once, and a dead receiver by the sender:

1. the sender sends every receiver the file list (name, size, sha256) and a small ``meta`` dict (e.g. the
   manifest's repo, revision and commit), so the receivers never ask the source anything;
2. every receiver announces the byte ranges it misses per file (``Sink.missing``; a warm node: none);
3. the sender streams each receiver exactly its missing ranges, point to point, in file order, in pieces of at
   most ``chunk`` bytes, read once per chunk-aligned window into one of two reused buffers (memory: 2 x chunk
   on each side; a receiver writes and hashes one piece in a thread while the next one arrives). A piece is
   sent once the source's ``ready`` frontier has passed its end, so receivers get a file while the sender is
   still downloading it. Every piece is preceded by a 32-byte header (data / end / abort), so a sender whose
   source fails stops every receiver at once. Receivers with nothing missing take no part in this step;
4. every receiver sends the sender its outcome and stats; the sender sends back one verdict: the lowest failing
   rank's error, raised on every member (same type, message and hint), or the same ``Report`` for every member.

A receiver whose sink fails (disk full) or whose file fails its sha256 keeps draining what the sender sends
(discarding it), so the stream and the exchange still complete and the error reaches every rank. What a sink
wrote stays recorded (``Sink.close``), so the next run resumes it, unless the sender's own source failed its
sha256 (``IntegrityError``): its abort header then says ``_DROP`` and each sink drops its unfinished files.
A member that dies (killed sender, lost node) breaks the group: every surviving member raises the same
``NetworkError`` (``BROKEN``) at once (TCP reset) or after the group's timeout (a node that vanished without a
reset).

Point to point rather than one broadcast of the union: each receiver takes only what it misses and a warm
node takes nothing, with no subgroup per set of needs; the cost is the sender's egress, which is N x the
missing bytes. For hundreds of nodes the same headers allow a relay (receivers forward pieces along a chain or
tree, as NCCL's ring broadcast does), see the sender.

NCCL (GPU tensors) is not used here. To carry the data pieces on the job's NCCL group, keep steps 1, 2 and 4 and
the headers on gloo (CPU objects, timeouts, a dead peer seen at once, where NCCL would hang until its watchdog
fires), and move only the piece tensors: the sender copies each window from a pinned host buffer into one
device buffer of ``chunk`` bytes, the receivers ``recv`` into theirs and copy it back to pinned memory for the
sink (one chunk of GPU memory per rank). With many nodes the same window can go to every receiver that misses it
with one ``broadcast`` on a subgroup per set of needs (NCCL pipelines it as a ring or tree).
"""
