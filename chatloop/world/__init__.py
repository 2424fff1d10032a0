"""The synthetic world (docs/WORLD.md): a land with users, labelers and a gold judge that plays the people of the
loop in the demo and the tests, and grades what the loop makes. It stands beside the loop: it uses the loop's record
types and stages, and only the pipeline, eval and the report card (gold metrics) and the CLI use it."""
