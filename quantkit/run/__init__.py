"""The calibration run: pipeline, one block at a time, recipes, estimates, the resumable work directory."""
