"""A callback for tests that stop a fit inside an epoch (or a round) and resume it."""


class StopAt:
    """Stops the fit at the first chunk boundary at or after ``steps`` optimizer steps."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, state, record):
        return False

    def on_chunk(self, state):
        return state.steps >= self.steps
