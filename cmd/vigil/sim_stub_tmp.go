package main

import "context"

func (p *platform) addSimulator() error                     { return nil }
func cmdSimulate(ctx context.Context, env *cliEnv) error { return nil }
