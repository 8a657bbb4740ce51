# Pretraining of one row and seed, submitted through `ftcl stage` (ftcl/runfolders.py): requeued and
# resumed from <run>/pretrain/checkpoints/last.pt when preempted or timed out; when the keys it reads
# changed, the previous folder is moved to <run>/.superseded/ first.


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


rule pretrain:
    input:
        # created before the first stage; a later update (another tracking store) reruns no stage
        mlflow=ancient(MLFLOW_EXPERIMENT),
    output:
        stage_done("pretrain"),
    log:
        f"{EXP_DIR}/logs/pretrain/{{row}}/seed{{seed}}.log",
    params:
        # recorded: the rerun trigger, the digest of the run-config keys this stage reads
        digest=lambda wildcards: PIPE.stage_digest(wildcards.row, int(wildcards.seed), "pretrain"),
        config=lambda wildcards: Unrecorded(PIPE.run_config_text(wildcards.row, int(wildcards.seed))),
        ftcl_stage=FTCL_STAGE["pretrain"],
        run_dir=lambda wildcards, output: os.path.dirname(output[0]),
        job_dir=f"{EXP_DIR}/logs/submitit/pretrain/{{row}}/seed{{seed}}",
    conda:
        "../envs/ftcl.yaml"
    threads: THREADS["pretrain"]
    shell:
        "{params.ftcl_stage} --run-dir {params.run_dir:q} --config-text {params.config:q}"
        " --job-dir {params.job_dir:q} --log {log:q}"
