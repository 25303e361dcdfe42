"""``python -m train --config configs/NAME.py --workdir DIR [--config.x.y=value ...]``.

List-valued keys take a comma-separated value, e.g. ``--config.data.paths=a.txt,b.jsonl``.
Configuration and environment errors print one line (``error: ...``, exit status 2).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from train import cli, xla_flags
from train.main import train_and_evaluate

cli.register_list_parser()
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    xla_flags.apply_defaults()  # before the first device is touched
    with cli.one_line_errors():
        result = train_and_evaluate(cli.loaded_config(FLAGS), FLAGS.workdir)
    print(
        f"step {result['step']}: train loss {result['train_loss']}, held-out loss "
        f"{result['first_eval_loss']} -> {result['eval_loss']}"
    )


if __name__ == "__main__":
    app.run(main)
