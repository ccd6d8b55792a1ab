// Command loadgen drives kubetune-server's fine-tuning reads for bench/server_latency.py: a
// compiled client, so the load costs the machine a fraction of the CPU the openai SDK's Python
// threads did, and the figures measure the server rather than its callers.
//
// Each of -clients goroutines keeps one keep-alive connection and calls GET
// /v1/fine_tuning/jobs/{id} (retrieve) of a random job, GET /v1/fine_tuning/jobs?after={id}&limit=20
// (list) after a random job, or the two alternating (-mix both); the jobs are named
// {prefix}{i:05d}, i < -jobs. Closed loop (-rate 0): a client calls again as soon as it has its
// answer; latency is call to answer. Open loop (-rate R): call i is due at start + i/R whatever
// came before and latency runs from when it was due. Every answer must be a 200 whose body names
// what was asked for; otherwise the run fails. Prints one JSON object on stdout.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

type options struct {
	url, tokenFile, project, prefix, mix string
	jobs, clients, requests              int
	rate                                 float64
}

func main() {
	var o options
	flag.StringVar(&o.url, "url", "", "the server's base URL (http://host:port)")
	flag.StringVar(&o.tokenFile, "token-file", "", "a file holding the caller's bearer token")
	flag.StringVar(&o.project, "project", "", "the OpenAI-Project header (the namespace)")
	flag.StringVar(&o.prefix, "prefix", "bench-", "job names: prefix then a 5-digit index")
	flag.StringVar(&o.mix, "mix", "both", "retrieve, list or both (alternating)")
	flag.IntVar(&o.jobs, "jobs", 500, "how many jobs there are")
	flag.IntVar(&o.clients, "clients", 50, "concurrent clients")
	flag.IntVar(&o.requests, "requests", 40, "calls per client")
	flag.Float64Var(&o.rate, "rate", 0, "open loop at this many calls/s in total (0: closed loop)")
	flag.Parse()
	summary, err := run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
	_ = json.NewEncoder(os.Stdout).Encode(summary)
}

type caller struct {
	http    *http.Client
	url     string
	token   string
	project string
}

// call makes one read and checks its answer names what was asked for.
func (c *caller) call(kind, job string) error {
	path, want := "/v1/fine_tuning/jobs/"+job, `"id":"`+job+`"`
	if kind == "list" {
		path, want = "/v1/fine_tuning/jobs?limit=20&after="+job, `"object":"list"`
	}
	req, err := http.NewRequest(http.MethodGet, c.url+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("OpenAI-Project", c.project)
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK || !bytes.Contains(body, []byte(want)) {
		return fmt.Errorf("%s %s: %d %.200s", kind, job, resp.StatusCode, body)
	}
	return nil
}

func run(o options) (map[string]any, error) {
	token, err := os.ReadFile(o.tokenFile)
	if err != nil {
		return nil, err
	}
	transport := &http.Transport{
		MaxIdleConns: o.clients, MaxIdleConnsPerHost: o.clients, MaxConnsPerHost: o.clients,
		IdleConnTimeout: time.Minute, DisableCompression: true,
	}
	c := &caller{&http.Client{Transport: transport, Timeout: time.Minute}, o.url,
		string(bytes.TrimSpace(token)), o.project}
	name := func(i int) string { return fmt.Sprintf("%s%05d", o.prefix, i) }
	// Every client's connection made before the clock starts: what is timed is calls.
	var warm sync.WaitGroup
	warmErr := make(chan error, o.clients)
	for range o.clients {
		warm.Go(func() { warmErr <- c.call("retrieve", name(0)) })
	}
	warm.Wait()
	close(warmErr)
	for err := range warmErr {
		if err != nil {
			return nil, err
		}
	}

	total := o.clients * o.requests
	var next atomic.Int64
	timings := map[string][]float64{"retrieve": {}, "list": {}}
	var mu sync.Mutex
	var failed atomic.Pointer[error]
	start := time.Now()
	var clients sync.WaitGroup
	for seed := range o.clients {
		clients.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(seed), 0))
			mine := map[string][]float64{}
			for {
				i := int(next.Add(1)) - 1
				if i >= total || failed.Load() != nil {
					break
				}
				kind := o.mix
				if kind == "both" {
					kind = [2]string{"retrieve", "list"}[i%2]
				}
				due := time.Now()
				if o.rate > 0 {
					due = start.Add(time.Duration(float64(i) / o.rate * float64(time.Second)))
					time.Sleep(time.Until(due))
				}
				if err := c.call(kind, name(rng.IntN(o.jobs))); err != nil {
					failed.Store(&err)
					break
				}
				mine[kind] = append(mine[kind], time.Since(due).Seconds())
			}
			mu.Lock()
			for kind, values := range mine {
				timings[kind] = append(timings[kind], values...)
			}
			mu.Unlock()
		})
	}
	clients.Wait()
	wall := time.Since(start).Seconds()
	if err := failed.Load(); err != nil {
		return nil, *err
	}
	summary := map[string]any{
		"seconds": round(wall, 1), "requests_per_second": round(float64(total)/wall, 1),
	}
	for kind, values := range timings {
		if len(values) > 0 {
			summary[kind] = summarize(values)
		}
	}
	return summary, nil
}

// summarize: count, p50, p99 and max in milliseconds, percentiles as bench/server_latency.py
// takes them (the value at the rounded rank).
func summarize(values []float64) map[string]any {
	sort.Float64s(values)
	at := func(q float64) float64 {
		return round(1000*values[int(math.Round(q/100*float64(len(values)-1)))], 1)
	}
	return map[string]any{
		"count": len(values), "p50_ms": at(50), "p99_ms": at(99),
		"max_ms": round(1000*values[len(values)-1], 1),
	}
}

func round(v float64, places int) float64 {
	scale := math.Pow(10, float64(places))
	return math.Round(v*scale) / scale
}
