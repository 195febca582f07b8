"""data.source: one loader per name the config takes."""
import typing

import pytest

from aeserve.training.data.config import DataConfig, Source
from aeserve.training.data.sources import SOURCES


def test_unknown_source_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"data.source 'mnist' is not one of \['csv', 'digits', 'fashion-mnist', 'images', 'npy', 'npz', 'table'\]"):
        DataConfig(source="mnist")


def test_every_source_the_config_takes_has_a_loader():
    assert list(SOURCES) == list(typing.get_args(Source))
