"""The run directory layout (DESIGN.md section 5) and access to what earlier stages wrote."""

from __future__ import annotations

from pathlib import Path

from diffex.data.loading import DataPlan
from diffex.errors import DiffexError

WEIGHT_FILES = ("model.safetensors", "model.pt")


class RunDir:
    """Paths inside ``RUN/`` and loaders for finished stages."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def data_plan(self) -> Path:
        return self.root / "data.json"

    def stage(self, name: str) -> Path:
        """Folder of a stage (classifier, autoencoder, directions, ...)."""
        return self.root / name

    def create(self) -> RunDir:
        """Create the run folder, with a clear error when that is impossible."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DiffexError(
                f"cannot create run folder {self.root}: {exc.strerror or exc}"
            ) from None
        return self

    def load_plan(self) -> DataPlan:
        """The data plan written by the first stage of this run."""
        if not self.data_plan.is_file():
            raise DiffexError(
                f"{self.root} has no data.json: run 'diffex train-classifier --data DIR --run "
                f"{self.root}' first"
            )
        return DataPlan.load(self.data_plan)

    def weights(self, stage: str) -> Path:
        """The weights file of a finished stage (a user's TorchScript classifier is model.pt)."""
        folder = self.stage(stage)
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
        how = (
            "'diffex train-classifier' or 'diffex use-classifier'"
            if stage == "classifier"
            else f"'diffex train-{stage}'"
        )
        raise DiffexError(f"{folder} has no model.safetensors: run {how} first")

    def require(self, stage: str) -> Path:
        """A finished stage's folder, or a clear error saying which command makes it."""
        return self.weights(stage).parent
