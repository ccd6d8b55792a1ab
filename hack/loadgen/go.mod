module kubetune.io/hack/loadgen

go 1.26.7
