"""What the tests share: fake upstreams, real servers started on loopback, browsers and stream readers."""
