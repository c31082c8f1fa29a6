import io

from rich.console import Console

from coordinator.live_view import RoundView


def test_live_view_renders_rounds_and_the_open_round_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    record = {
        "round": 1,
        "rounds_total": 3,
        "participants": 2,
        "selected": 3,
        "accuracy": 0.5,
        "loss": 1.2,
        "train_loss": 1.5,
        "bytes_up": 2048,
        "bytes_down": 4096,
        "seconds": 1.0,
    }
    with RoundView("r", 3, console=console) as view:
        view.open_round(1, 3, deadline_s=60)
        view.progress(received=2, rejected=1)
        assert "2/3 updates received, 1 rejected" in view.status_line()
        view.close_round(record)
        view.open_round(2, 3, deadline_s=60)
    text = out.getvalue()
    assert "50.0%" in text and "round 2/3" in text


def test_live_view_is_silent_when_not_a_terminal():
    out = io.StringIO()
    with RoundView("r", 3, console=Console(file=out, force_terminal=False)) as view:
        view.open_round(1, 3, deadline_s=60)
    assert not view.enabled and out.getvalue() == ""
