"""Train the digit classifier that ``mmwb bench sde`` and the digits score model's evaluation measure samples with.

    python pipelines/make_digits_classifier.py --out assets/models/digits-classifier

It trains on scikit-learn's digits training split (the fixed split of mmwb.data.digits) and prints its test
accuracy, which is also stored in the folder's config.json.
"""

import argparse
import dataclasses
from pathlib import Path

from mmwb.train.digit_classifier import DigitClassifierConfig, train_digit_classifier

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, default=Path("assets/models/digits-classifier"))
parser.add_argument("--runs", type=Path, default=Path("runs/digits-classifier"), help="checkpoints and logs")
parser.add_argument("--steps", type=int, default=1500)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

config = DigitClassifierConfig()
config.train = dataclasses.replace(config.train, out_dir=args.runs, max_steps=args.steps, seed=args.seed)
accuracy = train_digit_classifier(config, args.out)
print(f"digit classifier in {args.out}: test accuracy {accuracy:.4f}")
