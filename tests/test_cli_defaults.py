"""Each command repeats its stage configuration's defaults (it imports the stage lazily, so
that ``--help`` stays fast); they must agree with the dataclasses the stages run on."""

from __future__ import annotations

import dataclasses

import pytest

from diffex.cli import cli
from diffex.evaluate.run import EvaluateConfig
from diffex.explain.explain import ExplainConfig
from diffex.explain.rank import RankConfig
from diffex.train.autoencoder import AutoencoderTrainConfig
from diffex.train.classifier import ClassifierTrainConfig
from diffex.train.directions import DirectionTrainConfig

CASES = [
    ("train-classifier", ClassifierTrainConfig, "", 5),
    ("train-autoencoder", AutoencoderTrainConfig, "ae_", 8),
    ("train-directions", DirectionTrainConfig, "", 8),
    ("rank", RankConfig, "", 5),
    ("explain", ExplainConfig, "", 2),
    ("evaluate", EvaluateConfig, "", 2),
]


@pytest.mark.parametrize(("command", "config", "prefix", "at_least"), CASES)
def test_cli_defaults_match_the_stage_config(
    command: str, config: type, prefix: str, at_least: int
) -> None:
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    compared = 0
    for p in cli.commands[command].params:
        name = p.name.removeprefix(prefix) if p.name else ""
        if name not in fields or name == "seed":
            continue
        if not isinstance(p.default, (bool, int, float, str)) or p.default is None:
            continue  # flags without a default, and options whose None means "the stage's"
        assert p.default == fields[name], (command, p.name, p.default, fields[name])
        compared += 1
    assert compared >= at_least, (command, compared)
