"""The audit pipeline: frames -> map -> gallery -> trust -> reduce, and the run folder."""
