"""What the Airflow DAG and plugin use: alert callbacks, the gating-report browser and the
test-only fault hook."""
