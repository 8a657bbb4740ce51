"""The edge between the pipeline and the stages: run folders kept, resumed or moved aside
(:mod:`~ftcl.orchestrate.folders`), submitit launchers (:mod:`~ftcl.orchestrate.launcher`), and the job
wrapper that ties them to a stage (:mod:`~ftcl.orchestrate.job`). ``ftcl stage`` is its command."""
