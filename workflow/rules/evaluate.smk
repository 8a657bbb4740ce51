# Evaluation of a pretrained backbone: linear probe and weighted kNN, each its own submitted job.


rule linear:
    input:
        config=RUN_CONFIG,
        pretrain=stage_result("pretrain"),
    output:
        stage_result("linear"),
    log:
        f"{EXP_DIR}/logs/linear/{{row}}/seed{{seed}}.log",
    params:
        submit=SUBMIT["linear"],
        checkpoint=lambda wildcards, input: os.path.dirname(input.pretrain),
        out=lambda wildcards, output: os.path.dirname(output[0]),
        job_dir=f"{EXP_DIR}/logs/submitit/linear/{{row}}/seed{{seed}}",
    conda:
        "../envs/ftcl.yaml"
    threads: THREADS["linear"]
    shell:
        "{params.submit} --job-dir {params.job_dir:q} --log {log:q}"
        " -- linear --config {input.config:q} --checkpoint {params.checkpoint:q} --out {params.out:q}"


rule knn:
    input:
        config=RUN_CONFIG,
        pretrain=stage_result("pretrain"),
    output:
        stage_result("knn"),
    log:
        f"{EXP_DIR}/logs/knn/{{row}}/seed{{seed}}.log",
    params:
        submit=SUBMIT["knn"],
        checkpoint=lambda wildcards, input: os.path.dirname(input.pretrain),
        out=lambda wildcards, output: os.path.dirname(output[0]),
        job_dir=f"{EXP_DIR}/logs/submitit/knn/{{row}}/seed{{seed}}",
    conda:
        "../envs/ftcl.yaml"
    threads: THREADS["knn"]
    shell:
        "{params.submit} --job-dir {params.job_dir:q} --log {log:q}"
        " -- knn --config {input.config:q} --checkpoint {params.checkpoint:q} --out {params.out:q}"
