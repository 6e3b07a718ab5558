"""FSMGDA, the server-side multi-gradient baseline (its own package, as CleanRL gives a variant).

Client (``firm.fsmgda.client``): from the same global adapter and the same rollouts, one local
PPO update per objective (fixed weights e_m, each pass from the same adapter, critic and a fresh
optimiser), returning M adapters. Server (``firm.fsmgda.server``): average each objective's
adapters over clients (FedAvg), take the updates d_m = mean_c(adapter_{m,c}) - global, solve
lambda = argmin_simplex |sum_m l_m d_m|^2 (+ beta |l - p|^2, 0 for the classic method) and step
global += sum_m lambda_m d_m. M times FIRM's upload. The server part imports no trainer.
"""
