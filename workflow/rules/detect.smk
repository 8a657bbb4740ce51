# Detection transfer (Faster R-CNN fine-tuned from the pretrained backbone). Requested only when
# `detection` is in the config's `stages`; its settings are the run config's `detection.*` keys.


rule detection:
    input:
        config=RUN_CONFIG,
        pretrain=stage_result("pretrain"),
    output:
        stage_result("detection"),
    log:
        f"{EXP_DIR}/logs/detection/{{row}}/seed{{seed}}.log",
    params:
        submit=SUBMIT["detection"],
        checkpoint=lambda wildcards, input: os.path.dirname(input.pretrain),
        out=lambda wildcards, output: os.path.dirname(output[0]),
        job_dir=f"{EXP_DIR}/logs/submitit/detection/{{row}}/seed{{seed}}",
    conda:
        "../envs/ftcl.yaml"
    threads: THREADS["detection"]
    shell:
        "{params.submit} --job-dir {params.job_dir:q} --log {log:q}"
        " -- detect --config {input.config:q} --checkpoint {params.checkpoint:q} --out {params.out:q}"
