# The resolved run config of one row and seed, and its pretraining, submitted through
# `ftcl submit` (requeued and resumed from <out>/checkpoints/last.pt when preempted or timed out).


rule run_config:
    output:
        RUN_CONFIG,
    params:
        # the rerun trigger: a row and seed whose resolved config changed get a new config.yaml,
        # which reruns their stages (and no other row's)
        sha256=lambda wildcards: digest(run_config_text(wildcards)),
        text=lambda wildcards: Unrecorded(run_config_text(wildcards)),
        stage_dirs=lambda wildcards, output: [f"{os.path.dirname(output[0])}/{stage}" for stage in STAGES],
    log:
        f"{EXP_DIR}/logs/run_config/{{row}}/seed{{seed}}.log",
    conda:
        "../envs/ftcl.yaml"
    shell:
        # a new config starts its stages afresh: no resuming another config's checkpoint or MLflow run
        "rm -rf {params.stage_dirs:q} && printf '%s' {params.text:q} > {output:q}"
        " && echo 'wrote {output}' > {log:q}"


rule mlflow_experiment:
    output:
        MLFLOW_EXPERIMENT,
    params:
        tracking=tracking_settings(),
    log:
        f"{EXP_DIR}/logs/mlflow_experiment.log",
    run:
        create_mlflow_experiment(output[0])
        Path(log[0]).write_text(f"wrote {output[0]}\n")


localrules:
    run_config,
    mlflow_experiment,


rule pretrain:
    input:
        config=RUN_CONFIG,
        # created once; its later updates (a new tracking URI) rerun no stage
        mlflow=ancient(MLFLOW_EXPERIMENT),
    output:
        stage_result("pretrain"),
    log:
        f"{EXP_DIR}/logs/pretrain/{{row}}/seed{{seed}}.log",
    params:
        submit=SUBMIT["pretrain"],
        out=lambda wildcards, output: os.path.dirname(output[0]),
        job_dir=f"{EXP_DIR}/logs/submitit/pretrain/{{row}}/seed{{seed}}",
    conda:
        "../envs/ftcl.yaml"
    threads: THREADS["pretrain"]
    shell:
        "{params.submit} --job-dir {params.job_dir:q} --log {log:q}"
        " -- pretrain --config {input.config:q} --out {params.out:q}"
