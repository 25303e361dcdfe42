"""``python -m train --config configs/NAME.py --workdir DIR [--config.x.y=value ...]``.

List-valued keys take a comma-separated value, e.g. ``--config.data.paths=a.txt,b.jsonl``.
Configuration and environment errors print one line (``error: ...``, exit status 2).
"""

from train import cli
from train.console import number
from train.main import train_and_evaluate


def summary(result: dict) -> str:
    """The last line: the train loss at the last step and the held-out loss at the first and
    the last evaluation, each with its step (the last can be older than the last step)."""
    return (
        f"step {result['step']}: train loss {number(result['train_loss'])}, held-out loss "
        f"{number(result['first_eval_loss'])} (step {result['first_eval_step']}) -> "
        f"{number(result['eval_loss'])} (step {result['eval_step']})"
    )


if __name__ == "__main__":
    cli.run_program(
        train_and_evaluate,
        summary,
        config_help="Training config file.",
        workdir_help="Directory for checkpoints, metrics and plots.",
    )
