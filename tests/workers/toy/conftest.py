import pytest

from workers.toy import BUNDLED_DIR
from workers.wan_pipeline import WanT2V


@pytest.fixture(scope="session")
def toy() -> WanT2V:
    """The toy model shipped with the project, loaded the way a Wan2.2 folder is."""
    return WanT2V.from_folder(BUNDLED_DIR / "wan-toy")
