import pytest
import os, sys
sys.path.insert(0, os.path.dirname(__file__))
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
