"""The audit's stages: plan -> (per model) obtain -> map -> discover -> gallery -> trust -> reduce ->
write, each a module taking the run's plan; `audit.runner` sequences them (docs/architecture.md)."""
