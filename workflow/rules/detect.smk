# Detection transfer (Faster R-CNN fine-tuned from the pretrained backbone), through `ftcl stage`.
# Requested only when `detection` is in the config's `stages`; reruns when detection.* (or data,
# seed) or its pretraining changed.


rule detection:
    input:
        mlflow=ancient(MLFLOW_EXPERIMENT),
        pretrain=stage_done("pretrain"),
    output:
        stage_done("detection"),
    log:
        f"{EXP_DIR}/logs/detection/{{row}}/seed{{seed}}.log",
    params:
        # recorded: the rerun trigger, the digest of the run-config keys this stage reads
        digest=lambda wildcards: PIPE.stage_digest(wildcards.row, int(wildcards.seed), "detection"),
        config=lambda wildcards: Unrecorded(PIPE.run_config_text(wildcards.row, int(wildcards.seed))),
        ftcl_stage=FTCL_STAGE["detection"],
        run_dir=lambda wildcards, output: os.path.dirname(output[0]),
        job_dir=f"{EXP_DIR}/logs/submitit/detection/{{row}}/seed{{seed}}",
    conda:
        "../envs/ftcl.yaml"
    threads: THREADS["detection"]
    shell:
        "{params.ftcl_stage} --run-dir {params.run_dir:q} --config-text {params.config:q}"
        " --job-dir {params.job_dir:q} --log {log:q}"
