"""shardserve's serving side: router/scheduler, Ray Serve HTTP app, controller, client, CLI."""
