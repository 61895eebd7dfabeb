"""The measurements made with the engine: `tidesim calibrate` (timer, per-resource measurements,
the profile written), `tidesim validate` (prediction vs measurement of the same Schedules), and
the live decodes where the reference model runs through the executor: live.py (a policy's
Schedule, with the lossless check) and deploy.py (an online policy deciding forward by forward,
`tidesim generate`). Nothing is imported here, so importing the package stays cheap.
"""

__all__: list[str] = []
