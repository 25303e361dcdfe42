"""``python -m train --config configs/NAME.py --workdir DIR [--config.x.y=value ...]``.

List-valued keys take a comma-separated value, e.g. ``--config.data.paths=a.txt,b.jsonl``.
Configuration and environment errors print one line (``error: ...``, exit status 2).
"""

from train import cli
from train.main import train_and_evaluate


def summary(result: dict) -> str:
    return (
        f"step {result['step']}: train loss {result['train_loss']}, held-out loss "
        f"{result['first_eval_loss']} -> {result['eval_loss']}"
    )


if __name__ == "__main__":
    cli.run_program(
        train_and_evaluate,
        summary,
        config_help="Training config file.",
        workdir_help="Directory for checkpoints, metrics and plots.",
    )
