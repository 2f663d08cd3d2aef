"""What a command prints and returns for each kind of error."""

import pytest

from trainer.cli import run_main
from trainer.config import RecipeError
from trainer.engine.checkpoint import CheckpointError
from trainer.engine.runner import NonFiniteLossError
from trainer.models.backbone import InputSizeError


def raising(exc: Exception):
    def main():
        raise exc

    return main


@pytest.mark.parametrize(
    "exc",
    [
        RecipeError("optimizer.lr must be > 0, got -0.01."),
        CheckpointError("weights in 'x' do not fit the model"),
        InputSizeError("backbone 'maxvit' takes inputs of 224x224 only"),
        FileNotFoundError("annotation file 'a.json' does not exist."),
    ],
)
def test_a_user_error_is_one_line_and_status_2(exc, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(raising(exc))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {exc}\n"


def test_non_finite_losses_exit_with_status_1(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(raising(NonFiniteLossError("the loss was not finite")))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: the loss was not finite\n"


def test_a_bug_keeps_its_traceback():
    # A plain ValueError from deep inside is a bug to report, not a message to shorten.
    with pytest.raises(ValueError, match="internal"):
        run_main(raising(ValueError("internal")))


def test_extra_user_errors_of_a_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(raising(KeyError("column")), (KeyError,))
    assert exit_info.value.code == 2
