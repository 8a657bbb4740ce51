# Evaluation of a pretrained backbone: linear probe and weighted kNN, each its own submitted job
# through `ftcl stage`; each reruns when its own keys (eval.linear.*, eval.knn.*, data, seed) or its
# pretraining changed.


rule linear:
    input:
        mlflow=ancient(MLFLOW_EXPERIMENT),
        pretrain=stage_done("pretrain"),
    output:
        stage_done("linear"),
    log:
        f"{EXP_DIR}/logs/linear/{{row}}/seed{{seed}}.log",
    params:
        # recorded: the rerun trigger, the digest of the run-config keys this stage reads
        digest=lambda wildcards: PIPE.stage_digest(wildcards.row, int(wildcards.seed), "linear"),
        config=lambda wildcards: Unrecorded(PIPE.run_config_text(wildcards.row, int(wildcards.seed))),
        ftcl_stage=FTCL_STAGE["linear"],
        run_dir=lambda wildcards, output: os.path.dirname(output[0]),
        job_dir=f"{EXP_DIR}/logs/submitit/linear/{{row}}/seed{{seed}}",
    conda:
        "../envs/ftcl.yaml"
    threads: THREADS["linear"]
    shell:
        "{params.ftcl_stage} --run-dir {params.run_dir:q} --config-text {params.config:q}"
        " --job-dir {params.job_dir:q} --log {log:q}"


rule knn:
    input:
        mlflow=ancient(MLFLOW_EXPERIMENT),
        pretrain=stage_done("pretrain"),
    output:
        stage_done("knn"),
    log:
        f"{EXP_DIR}/logs/knn/{{row}}/seed{{seed}}.log",
    params:
        # recorded: the rerun trigger, the digest of the run-config keys this stage reads
        digest=lambda wildcards: PIPE.stage_digest(wildcards.row, int(wildcards.seed), "knn"),
        config=lambda wildcards: Unrecorded(PIPE.run_config_text(wildcards.row, int(wildcards.seed))),
        ftcl_stage=FTCL_STAGE["knn"],
        run_dir=lambda wildcards, output: os.path.dirname(output[0]),
        job_dir=f"{EXP_DIR}/logs/submitit/knn/{{row}}/seed{{seed}}",
    conda:
        "../envs/ftcl.yaml"
    threads: THREADS["knn"]
    shell:
        "{params.ftcl_stage} --run-dir {params.run_dir:q} --config-text {params.config:q}"
        " --job-dir {params.job_dir:q} --log {log:q}"
