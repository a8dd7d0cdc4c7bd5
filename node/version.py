"""The code version nodes announce: peers of another protocol version are refused by name."""

# 0.9: round info signed whole, with a commitment to the vector; digests signed (#10 C1);
# stage 0's split in the state digest replicas vouch for (#10 C2)
# 0.10: a node's hivemind peer id is its node key's; a member in a slot not its key's is left
# out of a round (#10 C1), so 0.9 nodes (random peer ids) could not average with 0.10 ones
# 0.11: STEP_DONE names the ids whose gradients the sender holds, and FORWARDED the ids it
# passed on: a stage's update no longer waits for a chain of notices from stage 0 (#11)
# 0.12: every stage but the last keeps its last applied step's weights and redoes a dead
# sibling's forwards of it (protocol/redo.py, redone forwards flagged grad_needed=False), and
# a draining replica stays while upstream has not applied: 0.11 nodes do neither
# 0.13: a forward of an id another live stage-0 replica sent first is refused ABORTED, and its
# sender drops the id from its share (flow.on_taken: splits that disagree heal); stage 0's
# window is sized at run time (node/protocol/window.py)
VERSION = "0.13.0"
