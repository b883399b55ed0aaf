"""The image drill's marker: `pytest -m image` selects it, `-m "not image"` leaves it out."""


def pytest_configure(config):
    config.addinivalue_line("markers", "image: runs the built image under Docker (tests/drills/container/drill.sh)")
