# The stages of a row and seed (pretrain, linear, knn, detection), one rule each, generated from the
# stage list: each runs `ftcl stage` (ftcl/orchestrate/job.py), which submits the stage through the
# launcher and resumes it from its checkpoint when requeued. A stage reruns when the run-config keys
# it reads changed (its recorded digest param) or the pretraining it reads was redone; the previous
# folder is then moved to <run>/.superseded/, never deleted.


rule mlflow_experiment:
    output:
        MLFLOW_EXPERIMENT,
    params:
        tracking=PIPE.tracking_store(),
    log:
        f"{EXP_DIR}/logs/mlflow_experiment.log",
    run:
        from ftcl import tracking

        tracking.create_experiment(params.tracking, PIPE.experiment, output[0])
        Path(log[0]).write_text(f"wrote {output[0]}\n")


localrules:
    mlflow_experiment,


for _stage in STAGES:

    rule:
        name:
            _stage
        input:
            # created before the first stage; a later update (another tracking store) reruns no stage
            mlflow=ancient(MLFLOW_EXPERIMENT),
            pretrain=[] if _stage == "pretrain" else stage_done("pretrain"),
        output:
            stage_done(_stage),
        log:
            f"{EXP_DIR}/logs/{_stage}/{{row}}/seed{{seed}}.log",
        params:
            # recorded: the rerun trigger, the digest of the run-config keys this stage reads
            digest=lambda wildcards, stage=_stage: PIPE.stage_digest(wildcards.row, int(wildcards.seed), stage),
            config=lambda wildcards, stage=_stage: Unrecorded(
                PIPE.resolved_text(wildcards.row, int(wildcards.seed), stage)
            ),
            ftcl_stage=FTCL_STAGE[_stage],
            run_dir=lambda wildcards, output: os.path.dirname(output[0]),
            job_dir=f"{EXP_DIR}/logs/submitit/{_stage}/{{row}}/seed{{seed}}",
        conda:
            "../envs/ftcl.yaml"
        threads: THREADS[_stage]
        shell:
            "{params.ftcl_stage} --run-dir {params.run_dir:q} --config-text {params.config:q}"
            " --job-dir {params.job_dir:q} --log {log:q}"
