"""The package's metadata lives in pyproject.toml; this file keeps the design
card's layout and `python setup.py` workflows working."""

from setuptools import setup

setup()
