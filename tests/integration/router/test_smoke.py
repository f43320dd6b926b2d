import psycopg


def test_psycopg_round_trip_through_router(router):
    with psycopg.connect(router.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select current_database()").fetchone() == ("job_alpha",)
