"""``lm-mini train`` as torchrun / srun start it, with an optional fault: ``python cluster_train.py ARGS...``.

``LM_MINI_TEST_FAULT=RANK:STEP:kill|hang`` makes that rank SIGKILL itself (a crashed node) or SIGSTOP itself
(a hung node) once it has finished optimizer step STEP, after that step's checkpoint if one was due.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch.callbacks import Callback  # noqa: E402

from lm_mini import cli  # noqa: E402
from lm_mini.training import run  # noqa: E402


class Fault(Callback):
    def __init__(self, spec: str):
        rank, step, self.kind = spec.split(":")
        self.rank, self.step = int(rank), int(step)

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL if self.kind == "kill" else signal.SIGSTOP)


if os.environ.get("LM_MINI_TEST_FAULT"):
    build_trainer = run.build_trainer

    def with_fault(*args, **kwargs):
        trainer, preemption = build_trainer(*args, **kwargs)
        trainer.callbacks.append(Fault(os.environ["LM_MINI_TEST_FAULT"]))  # after the step checkpoint
        return trainer, preemption

    run.build_trainer = with_fault

sys.exit(cli.main(sys.argv[1:]))
