"""Drivers: programs that run a model over data to make what a press reads.

  kvzap_train.py       KVzap scorer weights from kvjax's own KVzip scores (`kvjax train-scorer`)
  uncomp_calibrate.py  UNComp head groups and layer stages (`kvjax uncomp-calibrate`)
  zigzag_profile.py    ZigZagKV per-layer budgets (`kvjax zigzag-profile`)

They sit above the library (they import the loops and the presses) and below the CLI; the
artifacts they write (`kvjax.kvzap.weights`, `kvjax.uncomp.calibration`) and the corpus they
read (`kvjax.corpus`) stay low, where the presses can import them.
"""
