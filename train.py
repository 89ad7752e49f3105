"""Pretrain a SimCLIC encoder, evaluate it and write a report: the design
card's entry, the same as `simclic train` (`python train.py --help`)."""

import sys

from simclic_tf.commands import train

if __name__ == "__main__":
    sys.exit(train())
