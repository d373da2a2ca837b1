"""`python -m switch_jax.train --gin_file=F [--gin.NAME=VALUE ...]`: pre-train or fine-tune."""

from __future__ import annotations

from switch_jax import cli


def main(argv: list[str]) -> None:
    del argv
    from switch_jax.training import trainer

    trainer.train(cli.configs(), operative_config=cli.operative_config())


console_main = cli.entry(main)  # console script `switch-train`

if __name__ == "__main__":
    console_main()
