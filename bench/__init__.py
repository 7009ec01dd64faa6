"""sagaflow's benchmark harness: sagaflow against a no-framework ceiling and Celery.

``python -m bench`` (``make bench``) runs the raw ceiling (:mod:`bench.raw`),
sagaflow (:mod:`bench.node`) and a Celery chain (:mod:`bench.celery_chain`)
on the real RabbitMQ and PostgreSQL, each run in
its own database and vhost, checks every outcome, prints one JSON object per
run on stdout and readable tables on stderr. ``python -m bench --embedded``
runs sagaflow in memory, without servers. docs/performance.md describes the
method and the results.
"""
