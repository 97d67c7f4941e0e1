#!/bin/sh
# wait.sh STACK SECONDS: until every service of the stack has converged (jobs
# complete, replicated services with every replica running and healthy), or
# the deadline passes; then prints `docker service ls` and, on a timeout, what
# is failing.
set -eu
STACK=$1
deadline=$(( $(date +%s) + $2 ))

# One line per service: "name|mode|replicas", replicas as `docker service ls`
# shows them: "3/3" or "1/1 (max 1 per node)" for a replicated service, "0/1
# (1/1 completed)" for a job. The mode, not the parenthesis, tells a job.
pending() {
  docker service ls --filter "label=com.docker.stack.namespace=$STACK" \
    --format '{{.Name}}|{{.Mode}}|{{.Replicas}}' | while IFS='|' read -r name mode replicas; do
    case "$mode" in
      *job)  # done when every run completed
        done_=${replicas#*(}; done_=${done_%% *}
        [ "${done_%/*}" = "${done_#*/}" ] || echo "$name"
        ;;
      *)  # every replica running (and healthy, for a task with a health check)
        running=${replicas%% *}
        [ "${running%/*}" = "${running#*/}" ] || echo "$name"
        ;;
    esac
  done
}

while :; do
  waiting=$(pending)
  if [ -z "$waiting" ] && [ -n "$(docker service ls -q --filter "label=com.docker.stack.namespace=$STACK")" ]; then
    docker service ls --filter "label=com.docker.stack.namespace=$STACK"
    exit 0
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    printf 'swarm: %s did not converge within %s s; waiting for:\n%s\n' "$STACK" "$2" "$waiting" >&2
    docker service ls --filter "label=com.docker.stack.namespace=$STACK" >&2
    for name in $waiting; do
      docker service ps --no-trunc --format '{{.Name}} {{.CurrentState}} {{.Error}}' "$name" | head -5 >&2
      docker service logs --tail 20 "$name" >&2 2>&1 || true
    done
    exit 1
  fi
  sleep 2
done
